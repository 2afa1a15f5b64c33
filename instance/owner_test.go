package instance

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/aggregate"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/network"
)

// fakePorts is an owner's port-forwarding aggregate.
type fakePorts struct {
	mu    sync.Mutex
	ports []aggregate.Port
	err   error
}

func (f *fakePorts) PortForwarding(_ context.Context, owner, ref string) ([]aggregate.Port, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ports, f.err
}

func (f *fakePorts) set(err error, ports ...aggregate.Port) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ports, f.err = ports, err
}

// mark dates a file back, so that a file made anew shows.
func mark(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if err := os.Chtimes(p, marked, marked); err != nil {
			t.Fatal(err)
		}
	}
}

var marked = time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)

func isMarked(t *testing.T, path string) bool {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return info.ModTime().Equal(marked)
}

func TestInstancePortForwardingAndReinstall(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	ref := r.instanceMessage(64)
	ports := &fakePorts{}
	ports.set(nil, aggregate.Port{Port: 8080, TCP: true}, aggregate.Port{Port: 53, TCP: true, UDP: true})
	m := r.manager()
	m.opts.Ports = ports
	if err := m.Start(ctx, ref); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Erase(ctx, ref) })
	// 22, published 80, the aggregate's 8080 and 53 over both protocols on
	// one host port.
	rec, _ := r.records.Get(ctx, ref)
	byPort := map[string]network.Forward{}
	for _, f := range rec.Forwards {
		byPort[f.Proto+"/"+itoa(f.GuestPort)] = f
	}
	if len(rec.Forwards) != 5 || byPort["tcp/53"].HostPort != byPort["udp/53"].HostPort || byPort["tcp/8080"].HostPort == 0 {
		t.Fatalf("forwards %+v", rec.Forwards)
	}
	ssh := byPort["tcp/22"].HostPort

	// The owner drops 8080 and adds 9000/udp; update applies it, keeping
	// the host ports of the others.
	ports.set(nil, aggregate.Port{Port: 53, TCP: true, UDP: true}, aggregate.Port{Port: 9000, UDP: true})
	if running, err := m.UpdatePorts(ctx, ref); !running || err != nil {
		t.Fatalf("update: %v %v", running, err)
	}
	rec, _ = r.records.Get(ctx, ref)
	ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", network.TableName)
	if len(rec.Forwards) != 5 || rec.Forwards[0].HostPort != ssh || strings.Contains(ruleset, ":8080") || !strings.Contains(ruleset, "udp dport") || !strings.Contains(ruleset, ":9000") {
		t.Fatalf("after update %+v:\n%s", rec.Forwards, ruleset)
	}
	// An unreadable aggregate changes nothing.
	ports.set(errors.New("API down"))
	if _, err := m.UpdatePorts(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if again, _ := r.records.Get(ctx, ref); len(again.Forwards) != 5 {
		t.Fatalf("forwards lost when the aggregate was unreadable: %+v", again.Forwards)
	}
	ports.set(nil, aggregate.Port{Port: 53, TCP: true, UDP: true}, aggregate.Port{Port: 9000, UDP: true})

	// Reinstall keeping the volumes: a new root disk, the same volume.
	disks := filepath.Join(r.dir, "volumes", string(ref))
	root, vol := filepath.Join(disks, "rootfs.qcow2"), filepath.Join(disks, "volume-data.ext4")
	mark(t, root, vol)
	if err := m.Reinstall(ctx, ref, false); err != nil || !m.Running(ref) {
		t.Fatalf("reinstall: %v", err)
	}
	if isMarked(t, root) || !isMarked(t, vol) {
		t.Error("reinstall without erase_volumes: the root disk was kept or the volume was not")
	}
	if rec2, _ := r.records.Get(ctx, ref); rec2.Forwards[0].HostPort != ssh {
		t.Errorf("reinstall moved the host ports: %+v", rec2.Forwards)
	}
	// And erasing them.
	if err := m.Reinstall(ctx, ref, true); err != nil || !m.Running(ref) {
		t.Fatalf("reinstall: %v", err)
	}
	if isMarked(t, vol) {
		t.Error("reinstall with erase_volumes kept the volume")
	}
	// A stopped instance gets its ports at its next start.
	m.Stop(ctx, ref)
	if running, err := m.UpdatePorts(ctx, ref); running || err != nil {
		t.Fatalf("update of a stopped instance: %v %v", running, err)
	}
	if err := m.Reinstall(ctx, "0000000000000000000000000000000000000000000000000000000000000000", true); err == nil {
		t.Error("reinstall of an unknown instance")
	}
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }
