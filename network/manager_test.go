package network

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func TestManager(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "nft")
	pool, _ := NewPool(netip.MustParsePrefix("172.16.0.0/12"), 24, 4)
	fw := NewFirewall("lo", netip.MustParsePrefix("172.16.0.0/12"))
	t.Cleanup(func() { fw.Remove() })
	m := NewManager(pool, fw, PortRange{First: 24000, Last: 24002}, slog.New(slog.NewTextHandler(io.Discard, nil)))

	a, err := m.Attach(AttachRequest{Owner: "vm-a", Index: -1, Internet: true, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22}, {Proto: "udp", GuestPort: 53}}})
	if err != nil {
		t.Fatal(err)
	}
	if a.Tap != "avm4" || len(a.Forwards) != 2 || a.Forwards[0].HostPort != 24000 || a.Forwards[1].HostPort != 24000 {
		t.Errorf("attachment %+v", a)
	}
	b, err := m.Attach(AttachRequest{Owner: "vm-b", Index: -1, Internet: false, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22}, {Proto: "tcp", GuestPort: 80, HostPort: 24000}}})
	if err == nil {
		t.Fatalf("a taken host port was given twice: %+v", b)
	}
	if _, err := net.InterfaceByName("avm5"); err == nil {
		t.Error("failed attach left its tap")
	}
	b, err = m.Attach(AttachRequest{Owner: "vm-b", Index: -1, Internet: false, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22}}})
	if err != nil || b.Tap != "avm5" || b.Forwards[0].HostPort != 24001 {
		t.Fatalf("%+v %v", b, err)
	}
	ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", TableName)
	for _, want := range []string{"tcp dport 24000 dnat ip to 172.16.4.2:22", "udp dport 24000 dnat ip to 172.16.4.2:53", "tcp dport 24001 dnat ip to 172.16.5.2:22", `"avm4" : jump egress`, `oifname "lo" iifname vmap @internet`, "ether saddr != 06:00:ac:10:04:02 drop", "ip saddr 172.16.5.2 accept"} {
		if !strings.Contains(ruleset, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, ruleset)
		}
	}
	if neigh := testenv.Cmd(t, "ip", "neigh", "show", "dev", "avm4"); !strings.Contains(neigh, "172.16.4.2 lladdr 06:00:ac:10:04:02 PERMANENT") {
		t.Errorf("the guest's address is not a permanent neighbour on its tap:\n%s", neigh)
	}
	if strings.Contains(ruleset, `"avm5" : jump egress`) {
		t.Error("vm-b has internet")
	}

	// The node restarts: a new manager finds vm-a again, keeping its tap,
	// and hardens it as a tap made by an older node may not be.
	before, _ := net.InterfaceByName("avm4")
	rpFilter := "/proc/sys/net/ipv4/conf/avm4/rp_filter"
	if err := os.WriteFile(rpFilter, []byte("0"), 0o644); err != nil {
		t.Fatal(err)
	}
	pool2, _ := NewPool(netip.MustParsePrefix("172.16.0.0/12"), 24, 4)
	m2 := NewManager(pool2, fw, PortRange{First: 24000, Last: 24002}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	again, err := m2.Attach(AttachRequest{Owner: "vm-a", Index: a.Index, Internet: true, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22, HostPort: 24000}, {Proto: "udp", GuestPort: 53, HostPort: 24000}}})
	if err != nil || again.Index != a.Index || again.Forwards[0].HostPort != 24000 {
		t.Fatalf("%+v %v", again, err)
	}
	after, _ := net.InterfaceByName("avm4")
	if before.Index != after.Index {
		t.Error("the running VM's tap was recreated")
	}
	if v, err := os.ReadFile(rpFilter); err != nil || strings.TrimSpace(string(v)) != "1" {
		t.Errorf("rp_filter of a tap found again: %q %v", v, err)
	}
	if err := m2.RemoveOrphanTaps(); err != nil {
		t.Fatal(err)
	}
	if _, err := net.InterfaceByName("avm5"); err == nil {
		t.Error("orphan tap avm5 kept")
	}
	if err := m2.Detach("vm-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := net.InterfaceByName("avm4"); err == nil {
		t.Error("tap kept after detach")
	}
	if ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", TableName); strings.Contains(ruleset, "dnat") {
		t.Errorf("forwards kept after detach:\n%s", ruleset)
	}
}

func TestSetForwards(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "nft")
	pool, _ := NewPool(netip.MustParsePrefix("172.16.0.0/12"), 24, 4)
	fw := NewFirewall("lo", netip.MustParsePrefix("172.16.0.0/12"))
	t.Cleanup(func() { fw.Remove() })
	m := NewManager(pool, fw, PortRange{First: 25000, Last: 25003}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	a, err := m.Attach(AttachRequest{Owner: "vm-a", Index: -1, Internet: false, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Detach("vm-a") })
	// The owner asks for 53 over tcp and udp and 80: 22 keeps its port,
	// 53 gets one host port for both, a port asked twice is taken once.
	fws, err := m.SetForwards("vm-a", []PortRequest{{Proto: "tcp", GuestPort: 22}, {Proto: "tcp", GuestPort: 53}, {Proto: "udp", GuestPort: 53},
		{Proto: "tcp", GuestPort: 80}, {Proto: "tcp", GuestPort: 80}})
	if err != nil {
		t.Fatal(err)
	}
	if len(fws) != 4 || fws[0].HostPort != a.Forwards[0].HostPort || fws[1].HostPort != fws[2].HostPort || fws[3].HostPort == fws[1].HostPort {
		t.Fatalf("forwards %+v", fws)
	}
	ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", TableName)
	for _, want := range []string{"tcp dport 25001 dnat ip to 172.16.4.2:53", "udp dport 25001 dnat ip to 172.16.4.2:53", "tcp dport 25002 dnat ip to 172.16.4.2:80"} {
		if !strings.Contains(ruleset, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, ruleset)
		}
	}
	// More ports than the range holds: refused, the forwards stay.
	var many []PortRequest
	for p := range 10 {
		many = append(many, PortRequest{Proto: "tcp", GuestPort: uint16(1000 + p)})
	}
	if _, err := m.SetForwards("vm-a", many); err == nil {
		t.Fatal("ports past the range were given")
	}
	if got := m.Forwards("vm-a"); len(got) != 4 || got[3] != fws[3] {
		t.Fatalf("forwards after a failed change: %+v", got)
	}
	// Dropping 80 frees its host port for another VM.
	if _, err := m.SetForwards("vm-a", []PortRequest{{Proto: "tcp", GuestPort: 22}}); err != nil {
		t.Fatal(err)
	}
	b, err := m.Attach(AttachRequest{Owner: "vm-b", Index: -1, Internet: false, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22}, {Proto: "tcp", GuestPort: 80}, {Proto: "tcp", GuestPort: 443}}})
	if err != nil {
		t.Fatalf("freed ports not reused: %v", err)
	}
	m.Detach("vm-b")
	if _, err := m.SetForwards("vm-c", nil); err == nil {
		t.Error("forwards set for a VM without network")
	}
	_ = b
}

// recordedWrites records each table the manager writes, as the owners
// of the forwards it holds.
type recordedWrites struct{ tables [][]string }

func (r *recordedWrites) Apply(vms []VMRules) error {
	var table []string
	for _, vm := range vms {
		for _, f := range vm.Forwards {
			table = append(table, fmt.Sprintf("%s/%d->%s:%d", f.Proto, f.HostPort, vm.Guest, f.GuestPort))
		}
	}
	r.tables = append(r.tables, table)
	return nil
}

// TestRestartWritesEveryVMTakenBackAtOnce: a node that starts takes back
// the VMs an earlier node left running, whose table holds all of them.
// Written after each VM taken back, the first table would hold the first
// VM only: the second's forwards would be gone (new connections refused)
// until its own turn. With DeferWrites, the first table written holds both.
func TestRestartWritesEveryVMTakenBackAtOnce(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	prefix := netip.MustParsePrefix("172.16.0.0/12")
	ports := PortRange{First: 26000, Last: 26009}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	owners := []string{"vm-a", "vm-b"}
	pool, _ := NewPool(prefix, 24, 4)
	earlier := NewManager(pool, nil, ports, log)
	earlier.fw = &recordedWrites{}
	var running []Attachment
	for _, owner := range owners {
		a, err := earlier.Attach(AttachRequest{Owner: owner, Index: -1, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22}}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { DeleteTap(a.Tap) })
		running = append(running, a)
	}
	a := "tcp/26000->172.16.4.2:22"
	b := "tcp/26001->172.16.5.2:22"

	for _, tc := range []struct {
		name        string
		deferWrites bool
		want        [][]string // the tables written, in turn
	}{
		{"written at each attach", false, [][]string{{a}, {a, b}, {a, b}}},
		{"deferred until Apply", true, [][]string{{a, b}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pool, _ := NewPool(prefix, 24, 4)
			m := NewManager(pool, nil, ports, log)
			writes := &recordedWrites{}
			m.fw = writes
			if tc.deferWrites {
				m.DeferWrites()
			}
			for i, run := range running {
				req := AttachRequest{Owner: owners[i], Index: run.Index, Ports: []PortRequest{{Proto: "tcp", GuestPort: 22, HostPort: run.Forwards[0].HostPort}}}
				if _, err := m.Attach(req); err != nil {
					t.Fatal(err)
				}
			}
			if err := m.Apply(); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(writes.tables) != fmt.Sprint(tc.want) {
				t.Errorf("tables written %v, want %v", writes.tables, tc.want)
			}
			// Past Apply, a change is written at once.
			if _, err := m.SetForwards("vm-b", nil); err != nil {
				t.Fatal(err)
			}
			if last := writes.tables[len(writes.tables)-1]; fmt.Sprint(last) != fmt.Sprint([]string{a}) {
				t.Errorf("after Apply, dropping vm-b's forwards wrote %v", last)
			}
		})
	}
}
