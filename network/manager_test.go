package network

import (
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

	a, err := m.Attach("vm-a", -1, true, []PortRequest{{Proto: "tcp", GuestPort: 22}, {Proto: "udp", GuestPort: 53}})
	if err != nil {
		t.Fatal(err)
	}
	if a.Tap != "avm4" || len(a.Forwards) != 2 || a.Forwards[0].HostPort != 24000 || a.Forwards[1].HostPort != 24000 {
		t.Errorf("attachment %+v", a)
	}
	b, err := m.Attach("vm-b", -1, false, []PortRequest{{Proto: "tcp", GuestPort: 22}, {Proto: "tcp", GuestPort: 80, HostPort: 24000}})
	if err == nil {
		t.Fatalf("a taken host port was given twice: %+v", b)
	}
	if _, err := net.InterfaceByName("avm5"); err == nil {
		t.Error("failed attach left its tap")
	}
	b, err = m.Attach("vm-b", -1, false, []PortRequest{{Proto: "tcp", GuestPort: 22}})
	if err != nil || b.Tap != "avm5" || b.Forwards[0].HostPort != 24001 {
		t.Fatalf("%+v %v", b, err)
	}
	ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", TableName)
	for _, want := range []string{"tcp dport 24000 dnat ip to 172.16.4.2:22", "udp dport 24000 dnat ip to 172.16.4.2:53", "tcp dport 24001 dnat ip to 172.16.5.2:22", `"avm4" : jump egress`, `oifname "lo" iifname vmap @internet`, "ether saddr != 06:00:ac:10:04:02 drop", "ip saddr 172.16.5.2 accept"} {
		if !strings.Contains(ruleset, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, ruleset)
		}
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
	again, err := m2.Attach("vm-a", a.Index, true, []PortRequest{{Proto: "tcp", GuestPort: 22, HostPort: 24000}, {Proto: "udp", GuestPort: 53, HostPort: 24000}})
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
