package instance

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hostcheck"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/internal/backends"
	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
)

// The default UEFI firmware of Debian's ovmf package.
const (
	ovmfCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	ovmfVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// TestInstanceEndToEnd boots the default base image in both forms under
// QEMU, and its ext4 form under Firecracker where the host runs it (never
// on the machine this project is developed on), with cloud-init, logs in
// over SSH with the message's key, checks the disk's size, writes a file,
// restarts the node under the running instance, stops and starts the
// instance and reads the file back, then erases it.
func TestInstanceEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots two Debian VMs under emulation: minutes")
	}
	r := newRig(t)
	base := testassets.BaseImage(t)
	key, pub := testenv.SSHKey(t)
	testenv.RequireTools(t, "ssh")
	if _, err := os.Stat(ovmfCode); err != nil {
		t.Skipf("no UEFI firmware (install Debian's ovmf): %v", err)
	}
	forms := []struct {
		name, image, hypervisor string
	}{
		{"disk", base.Disk, hypervisor.QEMU},
		{"ext4", base.Ext4, hypervisor.QEMU},
		{"firecracker-ext4", base.Ext4, hypervisor.Firecracker},
	}
	r.choose = hostcheck.Decide(everything(), hostcheck.Settings{InstanceDefault: hypervisor.QEMU, UseJailer: true})
	// One manager per node process, shared by both forms as on a node.
	opts := func(m *Manager) *Manager {
		m.opts.DirectBoot = execution.Kernel{Kernel: base.Kernel, Vmlinux: base.Vmlinux, Initrd: base.Initrd, Cmdline: base.Cmdline}
		m.opts.UEFICode, m.opts.UEFIVars = ovmfCode, ovmfVars
		m.opts.StopTimeouts = hypervisor.StopTimeouts{Shutdown: 90 * time.Second, Quit: 10 * time.Second, Kill: 5 * time.Second}
		return m
	}
	m := opts(r.manager())
	var mu sync.Mutex
	restart := func() *Manager { // the node restarts under running instances
		mu.Lock()
		defer mu.Unlock()
		m.Shutdown()
		m = opts(r.manager())
		if err := m.Restore(context.Background()); err != nil {
			t.Errorf("restore: %v", err)
		}
		return m
	}
	current := func() *Manager { mu.Lock(); defer mu.Unlock(); return m }

	for _, form := range forms {
		t.Run(form.name, func(t *testing.T) {
			if form.hypervisor == hypervisor.Firecracker {
				r.realFirecracker(t)
			}
			ctx := context.Background()
			ref := r.messageFor(form.image, form.hypervisor, 3072, pub)
			start := time.Now()
			if err := current().Start(ctx, ref); err != nil {
				t.Fatal(err)
			}
			rec, _ := r.records.Get(ctx, ref)
			testenv.WaitSSH(t, key, rec.IPv4, 6*time.Minute)
			t.Logf("%s: allocation to SSH and cloud-init done: %s", form.name, time.Since(start).Round(time.Second))
			// cloud-init found password logins already off: sshd was
			// not restarted under the owner's first connections.
			if out, err := testenv.SSH(key, rec.IPv4, "journalctl -b -o cat -u ssh.service | grep -c '^Stopping'; true"); err != nil || out != "0" {
				t.Errorf("sshd stopped during the first boot (%q, %v)", out, err)
			}
			out, err := testenv.SSH(key, rec.IPv4, "lsblk -bdno SIZE /dev/vda; df -B1 --output=size / | tail -1; echo kept > /root/data; sync")
			if err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			fields := strings.Fields(out)
			if len(fields) != 2 {
				t.Fatalf("output %q", out)
			}
			disk, _ := strconv.ParseInt(fields[0], 10, 64)
			fs, _ := strconv.ParseInt(fields[1], 10, 64)
			if disk != 3072<<20 || fs < 2800<<20 {
				t.Errorf("disk %d bytes and root filesystem %d bytes, want 3 GiB both", disk, fs)
			}

			restart()
			if out, err := testenv.SSH(key, rec.IPv4, "cat /root/data"); err != nil || out != "kept" {
				t.Fatalf("after the node restart: %q %v", out, err)
			}
			if _, err := current().Stop(ctx, ref); err != nil {
				t.Fatal(err)
			}
			if err := current().Start(ctx, ref); err != nil {
				t.Fatal(err)
			}
			testenv.WaitSSH(t, key, rec.IPv4, 6*time.Minute)
			if out, err := testenv.SSH(key, rec.IPv4, "cat /root/data"); err != nil || out != "kept" {
				t.Fatalf("after stop and start: %q %v", out, err)
			}
			if err := current().Erase(ctx, ref); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(r.dir, "volumes", string(ref))); !os.IsNotExist(err) {
				t.Errorf("disks left: %v", err)
			}
		})
	}
}

// realFirecracker gives the rig the host's Firecracker, jailed where a
// jailer is installed, or skips the test where Firecracker cannot run.
func (r *rig) realFirecracker(t *testing.T) {
	fc := testassets.RequireFirecracker(t)
	driver, err := firecracker.New(firecracker.Options{Firecracker: fc.Binary, Jailer: fc.Jailer, UseJailer: fc.Jailer != "",
		JailerBase: filepath.Join(r.dir, "jail"), FirstUID: 1000400}, r.log)
	if err != nil {
		t.Fatal(err)
	}
	r.hvs[hypervisor.Firecracker] = backends.FirecrackerBackend(driver)
}

// messageFor stores an image and an INSTANCE message over it, to run under
// hv, with pub as its SSH key.
func (r *rig) messageFor(image, hv string, sizeMiB int, pub string) message.ItemHash {
	r.t.Helper()
	added, err := r.st.AddFile(context.Background(), image)
	if err != nil {
		r.t.Fatal(err)
	}
	return r.instanceUnder(added.Ref, hv, sizeMiB, pub)
}

// instanceOver stores an INSTANCE message over the stored image parent,
// to run under QEMU, with pub as its SSH key.
func (r *rig) instanceOver(parent message.ItemHash, sizeMiB int, pub string) message.ItemHash {
	r.t.Helper()
	return r.instanceUnder(parent, hypervisor.QEMU, sizeMiB, pub)
}

func (r *rig) instanceUnder(parent message.ItemHash, hv string, sizeMiB int, pub string) message.ItemHash {
	r.t.Helper()
	return r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000000, "allow_amend": false,
		"authorized_keys": []string{pub},
		"environment":     map[string]any{"internet": false, "hypervisor": hv},
		"resources":       map[string]any{"vcpus": 1, "memory": 1024, "seconds": 30},
		"rootfs":          map[string]any{"parent": map[string]any{"ref": string(parent), "use_latest": false}, "persistence": "host", "size_mib": sizeMiB},
	})
}

// BenchmarkAllocationToSSH times, for the UEFI disk form of the base image,
// a start of a new instance until SSH answers and cloud-init is done (the
// disk is made, the seed written, the VM booted). Under emulation (TCG)
// this is minutes; run it with -benchtime 1x.
func BenchmarkAllocationToSSH(b *testing.B) {
	r := newRig(b)
	base := testassets.BaseImage(b)
	key, pub := testenv.SSHKey(b)
	m := r.manager()
	m.opts.UEFICode, m.opts.UEFIVars = ovmfCode, ovmfVars
	ctx := context.Background()
	var total time.Duration
	for i := range b.N {
		ref := r.messageFor(base.Disk, hypervisor.QEMU, 2048+i, pub)
		start := time.Now()
		if err := m.Start(ctx, ref); err != nil {
			b.Fatal(err)
		}
		rec, _ := r.records.Get(ctx, ref)
		testenv.WaitSSH(b, key, rec.IPv4, 6*time.Minute)
		total += time.Since(start)
		if err := m.Erase(ctx, ref); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/allocation-to-ssh")
}
