package network

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// The test's namespace plays the node. Veth pairs named like taps stand for
// the VMs' NICs: the firewall matches interface names, so the rules are the
// same as for real taps.
func TestFirewallIsolation(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "ip", "nft")
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	internet := testenv.NetNS(t, "inet")
	testenv.Veth(t, "up0", "10.99.0.1/24", internet, "eth0", "10.99.0.2/24", "")
	vm4 := testenv.NetNS(t, "vm4")
	testenv.Veth(t, "avm4", "172.16.4.1/24", vm4, "eth0", "172.16.4.2/24", "172.16.4.1")
	vm5 := testenv.NetNS(t, "vm5")
	testenv.Veth(t, "avm5", "172.16.5.1/24", vm5, "eth0", "172.16.5.2/24", "172.16.5.1")

	fw := NewFirewall("up0", netip.MustParsePrefix("172.16.0.0/12"))
	t.Cleanup(func() { _ = fw.Remove() })
	rules := []VMRules{
		{Tap: "avm4", Guest: netip.MustParseAddr("172.16.4.2"), Internet: true,
			Forwards: []Forward{{Proto: "tcp", HostPort: 24000, GuestPort: 8080}}},
		{Tap: "avm5", Guest: netip.MustParseAddr("172.16.5.2")},
	}
	for range 2 { // applying twice converges to the same table
		if err := fw.Apply(rules); err != nil {
			t.Fatal(err)
		}
	}
	ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", TableName)
	testenv.Golden(t, filepath.Join("testdata", "ruleset.nft"), []byte(ruleset))

	testenv.Listen(t, internet, "10.99.0.2:80")
	testenv.Listen(t, vm4, "172.16.4.2:8080")
	testenv.Listen(t, vm5, "172.16.5.2:8080")
	testenv.Listen(t, "", "0.0.0.0:9999") // a service of the host's own

	reach := []struct {
		name, from, to string
		ok             bool
		seenFrom       string // source address the listener must see
	}{
		{"egress with internet, masqueraded", vm4, "10.99.0.2:80", true, "10.99.0.1"},
		{"egress without internet", vm5, "10.99.0.2:80", false, ""},
		{"vm to vm", vm4, "172.16.5.2:8080", false, ""},
		{"vm to vm, other way", vm5, "172.16.4.2:8080", false, ""},
		{"vm to host service on its gateway", vm4, "172.16.4.1:9999", false, ""},
		{"vm to host service on the uplink", vm4, "10.99.0.1:9999", false, ""},
		{"port forward from outside", internet, "10.99.0.1:24000", true, "10.99.0.2"},
		{"port forward from the node itself", "", "10.99.0.1:24000", true, "10.99.0.1"},
		{"unforwarded port from outside", internet, "172.16.4.2:8080", false, ""},
	}
	for _, r := range reach {
		seen, err := testenv.Dial(r.from, r.to)
		if r.ok != (err == nil) {
			t.Errorf("%s: reachable=%v, want %v (%v)", r.name, err == nil, r.ok, err)
			continue
		}
		if r.ok && !strings.HasPrefix(seen, r.seenFrom+":") {
			t.Errorf("%s: listener saw %s, want %s", r.name, seen, r.seenFrom)
		}
	}
	// The node itself reaches its VMs (the proxy does).
	out, err := exec.Command("ip", "netns", "exec", vm4, "true").CombinedOutput()
	if err != nil {
		t.Fatal(err, string(out))
	}

	if err := fw.Remove(); err != nil {
		t.Fatal(err)
	}
	if tables := testenv.Cmd(t, "nft", "list", "tables"); strings.Contains(tables, TableName) {
		t.Errorf("table left after Remove: %s", tables)
	}
	if err := fw.Remove(); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

func TestFirewallRefusesBadRules(t *testing.T) {
	fw := NewFirewall("up0", netip.MustParsePrefix("172.16.0.0/12"))
	for _, vm := range []VMRules{
		{Tap: "eth0", Guest: netip.MustParseAddr("172.16.4.2")},
		{Tap: "avm4", Guest: netip.MustParseAddr("fc00::2")},
		{Tap: "avm4", Guest: netip.MustParseAddr("172.16.4.2"), Forwards: []Forward{{Proto: "sctp", HostPort: 1, GuestPort: 1}}},
		{Tap: "avm4", Guest: netip.MustParseAddr("172.16.4.2"), Forwards: []Forward{{Proto: "tcp", HostPort: 0, GuestPort: 1}}},
	} {
		if err := fw.Apply([]VMRules{vm}); err == nil {
			t.Errorf("%+v accepted", vm)
		}
	}
}
