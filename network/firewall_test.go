package network

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testenv"
)

// The node of the firewall tests. Its uplink up0 (10.99.0.1/24,
// 2001:db8:99::1/64) leads to an "internet" namespace (10.99.0.2,
// 2001:db8:99::2), which is also its default gateway and holds the
// addresses VMs try to reach: 203.0.113.10 and 2001:db8:ff::10 (the public
// internet), 169.254.169.254 (a cloud's metadata service), 198.51.100.10
// (an operator's network the host routes through the uplink) and
// 192.0.2.10 (another such network, which the operator allows). A "lan"
// namespace behind lan0 (192.168.50.0/24) is an operator's network on
// another interface. 10.99.0.2 is also the guests' DNS server.
var (
	testPool   = netip.MustParsePrefix("172.16.0.0/12")
	testEgress = Egress{Allowed: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, DNS: []netip.Addr{netip.MustParseAddr("10.99.0.2")}}
	// testRoutes are the routes of that node that the firewall finds (the
	// default routes and the taps' routes aside).
	testRoutes = []netip.Prefix{
		netip.MustParsePrefix("10.99.0.0/24"), netip.MustParsePrefix("192.168.50.0/24"),
		netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("192.0.2.0/24"),
		netip.MustParsePrefix("2001:db8:99::/64"), netip.MustParsePrefix("fe80::/64"), netip.MustParsePrefix("::1/128"),
	}
)

// testVM is one VM of the tests: A (avm4) has internet and a published
// port, B (avm5) has neither, C (avm6) has internet, an IPv6 address and a
// published port.
type testVM struct {
	VMRules
	host, host6 netip.Prefix // the host's end, on the tap
}

func testVMs(t testing.TB) []testVM {
	t.Helper()
	pool, err := NewPool(testPool, 24, 4)
	if err != nil {
		t.Fatal(err)
	}
	_, host6, guest6, err := StaticIPv6(netip.MustParsePrefix("2001:db8:aaaa:1::/64"), 3, "decadecadecadecadecadecadecadecadecadecadecadecadecadecadecadeca")
	if err != nil {
		t.Fatal(err)
	}
	var vms []testVM
	for i, r := range []VMRules{
		{Internet: true, Forwards: []Forward{{Proto: "tcp", HostPort: 24000, GuestPort: 8080}}},
		{},
		{Internet: true, Guest6: guest6, Forwards: []Forward{{Proto: "tcp", HostPort: 24001, GuestPort: 22}}},
	} {
		a, err := pool.At(4 + i)
		if err != nil {
			t.Fatal(err)
		}
		r.Tap, r.MAC, r.Guest = a.Tap, a.MAC(), a.Guest
		vm := testVM{VMRules: r, host: a.HostPrefix()}
		if r.Guest6.IsValid() {
			vm.host6 = netip.PrefixFrom(host6, 124)
		}
		vms = append(vms, vm)
	}
	return vms
}

func rulesOf(vms []testVM) []VMRules {
	out := make([]VMRules, len(vms))
	for i, vm := range vms {
		out[i] = vm.VMRules
	}
	return out
}

// goldenTable is the table of the test node; the root tests check that
// nft prints the table Apply writes exactly so.
var goldenTable = filepath.Join("testdata", "ruleset.nft")

func TestRulesGolden(t *testing.T) {
	table := buildTable(tableSpec{
		uplink: "up0", pool: testPool, vms: rulesOf(testVMs(t)),
		blocked: blockedDestinations(testRoutes), allowed: testEgress.Allowed, dns: testEgress.DNS,
	})
	testenv.Golden(t, goldenTable, []byte(table.String()))

	// nft prints a map's keys in its own order, which the rendering follows.
	if m := tapMap("taps", []string{"avm7", "avm4", "avm12", "avm100", "avm33", "avm1000", "avm40", "avm41"}, guardChain); fmt.Sprint(m.keys) !=
		"[avm4 avm7 avm40 avm41 avm12 avm33 avm100 avm1000]" {
		t.Errorf("map keys in the order %v", m.keys)
	}

	// Without VMs the table still drops what comes from any tap.
	empty := buildTable(tableSpec{uplink: "up0", pool: testPool}).String()
	for _, want := range []string{"\t\tiifname \"avm*\" drop\n\t}\n\n\tchain forward", "ip saddr 172.16.0.0/12 oifname \"up0\" masquerade"} {
		if !strings.Contains(empty, want) {
			t.Errorf("table without VMs lacks %q:\n%s", want, empty)
		}
	}
	if strings.Contains(empty, "chain from_") || strings.Contains(empty, "icmpv6") {
		t.Errorf("table without VMs has rules for none:\n%s", empty)
	}
	// Without an uplink nothing leaves and nothing is masqueraded.
	if s := buildTable(tableSpec{pool: testPool, vms: rulesOf(testVMs(t))}).String(); strings.Contains(s, "masquerade") || strings.Contains(s, "egress") {
		t.Errorf("table without an uplink lets VMs out:\n%s", s)
	}
}

func TestBlockedDestinations(t *testing.T) {
	got := blockedDestinations([]netip.Prefix{
		netip.MustParsePrefix("10.1.0.0/16"),         // inside 10.0.0.0/8
		netip.MustParsePrefix("203.0.113.77/24"),     // not masked
		netip.MustParsePrefix("203.0.113.0/25"),      // inside the one before
		netip.MustParsePrefix("198.51.100.0/24"),     // twice
		netip.MustParsePrefix("198.51.100.0/24"),     //
		netip.MustParsePrefix("0.0.0.0/0"),           // a default route is not a network of the operator's
		netip.MustParsePrefix("2001:db8:5::/48"),     //
		netip.MustParsePrefix("fe80::/64"),           // inside fe80::/10
		netip.MustParsePrefix("::/0"),                //
		netip.MustParsePrefix("172.16.4.0/24"),       // inside 172.16.0.0/12
		netip.MustParsePrefix("100.64.0.0/10"),       // equal to a non-public range
		netip.MustParsePrefix("2001:db8:5:1::/64"),   // inside 2001:db8:5::/48
		netip.MustParsePrefix("::ffff:10.0.0.0/104"), // inside ::ffff:0.0.0.0/96
	})
	want := []string{"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
		"192.168.0.0/16", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
		"::/128", "::1/128", "::ffff:0.0.0.0/96", "64:ff9b:1::/48", "2001:db8:5::/48", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("blocked\n %v\nwant\n %v", got, want)
	}
}

func TestFirewallRefusesBadRules(t *testing.T) {
	fw := NewFirewall("up0", testPool)
	good := testVMs(t)[0].VMRules
	with := func(change func(*VMRules)) VMRules {
		vm := good
		change(&vm)
		return vm
	}
	for name, vms := range map[string][]VMRules{
		"not a tap":           {with(func(vm *VMRules) { vm.Tap = "eth0" })},
		"bare prefix":         {with(func(vm *VMRules) { vm.Tap = "avm" })},
		"tap name too long":   {with(func(vm *VMRules) { vm.Tap = "avm1234567890123" })},
		"IPv6 as IPv4":        {with(func(vm *VMRules) { vm.Guest = netip.MustParseAddr("fc00::2") })},
		"no IPv4":             {with(func(vm *VMRules) { vm.Guest = netip.Addr{} })},
		"IPv4 as IPv6":        {with(func(vm *VMRules) { vm.Guest6 = netip.MustParseAddr("172.16.4.3") })},
		"mapped IPv6":         {with(func(vm *VMRules) { vm.Guest6 = netip.MustParseAddr("::ffff:172.16.4.3") })},
		"zoned IPv6":          {with(func(vm *VMRules) { vm.Guest6 = netip.MustParseAddr("fe80::1%avm4") })},
		"no MAC":              {with(func(vm *VMRules) { vm.MAC = nil })},
		"short MAC":           {with(func(vm *VMRules) { vm.MAC = net.HardwareAddr{6, 0, 1} })},
		"multicast MAC":       {with(func(vm *VMRules) { vm.MAC = net.HardwareAddr{1, 0, 0x5e, 0, 0, 1} })},
		"long MAC":            {with(func(vm *VMRules) { vm.MAC = make(net.HardwareAddr, 20) })},
		"sctp":                {with(func(vm *VMRules) { vm.Forwards = []Forward{{Proto: "sctp", HostPort: 1, GuestPort: 1}} })},
		"port 0":              {with(func(vm *VMRules) { vm.Forwards = []Forward{{Proto: "tcp", HostPort: 0, GuestPort: 1}} })},
		"one tap for two VMs": {good, with(func(vm *VMRules) { vm.Guest = netip.MustParseAddr("172.16.9.2") })},
		"one address for two": {good, with(func(vm *VMRules) { vm.Tap = "avm9" })},
	} {
		if err := fw.Apply(vms); err == nil {
			t.Errorf("%s: %+v accepted", name, vms)
		}
	}
}

func TestSetEgressRefuses(t *testing.T) {
	fw := NewFirewall("up0", testPool)
	for name, e := range map[string]Egress{
		"host bits":    {Allowed: []netip.Prefix{netip.MustParsePrefix("10.1.2.3/24")}},
		"zero prefix":  {Allowed: []netip.Prefix{{}}},
		"zero address": {DNS: []netip.Addr{{}}},
		"mapped DNS":   {DNS: []netip.Addr{netip.MustParseAddr("::ffff:9.9.9.9")}},
	} {
		if err := fw.SetEgress(e); err == nil {
			t.Errorf("%s: %+v accepted", name, e)
		}
	}
	if err := fw.SetEgress(testEgress); err != nil {
		t.Error(err)
	}
}

// testNode builds the network around the test's namespace (see the
// variables above) and returns the internet and lan namespaces.
func testNode(t testing.TB) (internet, lan string) {
	t.Helper()
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "ip", "nft")
	// Addresses are usable at once: no duplicate address detection.
	sysctl := func(ns, key, value string) {
		if ns == "" {
			if err := os.WriteFile(filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/")), []byte(value), 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		testenv.Cmd(t, "ip", "netns", "exec", ns, "sysctl", "-q", "-w", key+"="+value)
	}
	for _, k := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		sysctl("", k, "0")
	}
	sysctl("", "net.ipv4.ip_forward", "1")
	sysctl("", "net.ipv6.conf.all.forwarding", "1")
	// Each tap's own rp_filter decides: the kernel uses the higher of it
	// and "all".
	sysctl("", "net.ipv4.conf.all.rp_filter", "0")

	internet = testenv.NetNS(t, "inet")
	lan = testenv.NetNS(t, "lan")
	for _, ns := range []string{internet, lan} {
		sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
		sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
	}
	testenv.Veth(t, "up0", "10.99.0.1/24", internet, "eth0", "10.99.0.2/24", "")
	testenv.Cmd(t, "ip", "addr", "add", "2001:db8:99::1/64", "dev", "up0", "nodad")
	testenv.Cmd(t, "ip", "-n", internet, "addr", "add", "2001:db8:99::2/64", "dev", "eth0", "nodad")
	for _, a := range []string{"203.0.113.10/32", "169.254.169.254/32", "198.51.100.10/32", "192.0.2.10/32", "2001:db8:ff::10/128"} {
		testenv.Cmd(t, "ip", "-n", internet, "addr", "add", a, "dev", "lo")
	}
	testenv.Cmd(t, "ip", "-n", internet, "route", "add", "2001:db8:aaaa::/48", "via", "2001:db8:99::1")
	// Routes through up0 go with it when the test ends.
	testenv.Cmd(t, "ip", "route", "add", "default", "via", "10.99.0.2")
	testenv.Cmd(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:99::2")
	testenv.Cmd(t, "ip", "route", "add", "198.51.100.0/24", "via", "10.99.0.2")
	testenv.Cmd(t, "ip", "route", "add", "192.0.2.0/24", "via", "10.99.0.2")
	testenv.Veth(t, "lan0", "192.168.50.1/24", lan, "eth0", "192.168.50.2/24", "192.168.50.1")
	return internet, lan
}

// checkListed checks that nft prints the table Apply wrote as the golden
// file has it: the rules the kernel holds are the ones the golden test
// reads.
func checkListed(t *testing.T) {
	t.Helper()
	listed := testenv.Cmd(t, "nft", "list", "table", "inet", TableName)
	want, err := os.ReadFile(goldenTable)
	if err != nil {
		t.Fatal(err)
	}
	if listed != string(want) {
		t.Errorf("nft lists a table other than %s:\n%s", goldenTable, listed)
	}
}

// The test's namespace plays the node. Veth pairs named like taps stand for
// the VMs' NICs: the firewall matches interface names and MACs, so the rules
// are the same as for real taps.
func TestFirewallIsolation(t *testing.T) {
	internet, lan := testNode(t)
	vms := testVMs(t)
	ns := map[string]string{}
	for _, vm := range vms {
		n := testenv.NetNS(t, vm.Tap)
		ns[vm.Tap] = n
		testenv.Veth(t, vm.Tap, vm.host.String(), n, "eth0", netip.PrefixFrom(vm.Guest, vm.host.Bits()).String(), vm.host.Addr().String())
		testenv.Cmd(t, "ip", "-n", n, "link", "set", "eth0", "address", vm.MAC.String())
		if vm.Guest6.IsValid() {
			testenv.Cmd(t, "ip", "addr", "add", vm.host6.String(), "dev", vm.Tap, "nodad")
			testenv.Cmd(t, "ip", "-n", n, "addr", "add", netip.PrefixFrom(vm.Guest6, 124).String(), "dev", "eth0", "nodad")
			testenv.Cmd(t, "ip", "-n", n, "-6", "route", "add", "default", "via", vm.host6.Addr().String())
		}
	}
	vmA, vmB, vmC := ns["avm4"], ns["avm5"], ns["avm6"]

	fw := NewFirewall("up0", testPool)
	if err := fw.SetEgress(testEgress); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fw.Remove() })
	for range 2 { // applying twice converges to the same table
		if err := fw.Apply(rulesOf(vms)); err != nil {
			t.Fatal(err)
		}
	}
	checkListed(t)

	testenv.Listen(t, internet, ":80")
	testenv.Listen(t, internet, ":53")
	testenv.Listen(t, lan, ":80")
	testenv.Listen(t, vmA, ":8080")
	testenv.Listen(t, vmB, ":8080")
	testenv.Listen(t, vmC, ":22")
	testenv.Listen(t, vmC, ":8080")
	testenv.Listen(t, "", ":9999") // a service of the host's own

	reach := []struct {
		name, from, to string
		ok             bool
		seenFrom       string // source address the listener must see
	}{
		{"egress with internet, masqueraded", vmA, "203.0.113.10:80", true, "10.99.0.1"},
		{"egress without internet", vmB, "203.0.113.10:80", false, ""},
		{"cloud metadata service", vmA, "169.254.169.254:80", false, ""},
		{"operator's network on the uplink", vmA, "10.99.0.2:80", false, ""},
		{"operator's network routed through the uplink", vmA, "198.51.100.10:80", false, ""},
		{"operator's network on another interface", vmA, "192.168.50.2:80", false, ""},
		{"allowed operator's network", vmA, "192.0.2.10:80", true, "10.99.0.1"},
		{"the guests' DNS server", vmA, "10.99.0.2:53", true, "10.99.0.1"},
		{"vm to vm", vmA, "172.16.5.2:8080", false, ""},
		{"vm to vm, other way", vmB, "172.16.4.2:8080", false, ""},
		{"vm to host service on its gateway", vmA, "172.16.4.1:9999", false, ""},
		{"vm to host service on the uplink", vmA, "10.99.0.1:9999", false, ""},
		{"vm to host service on another VM's gateway", vmA, "172.16.5.1:9999", false, ""},
		{"port forward from outside", internet, "10.99.0.1:24000", true, "10.99.0.2"},
		{"port forward from the node itself", "", "10.99.0.1:24000", true, "10.99.0.1"},
		{"unforwarded port from outside", internet, "172.16.4.2:8080", false, ""},

		{"IPv6 egress, routed", vmC, "[2001:db8:ff::10]:80", true, "2001:db8:aaaa:1:3:deca:deca:dec1"},
		{"IPv6 operator's network on the uplink", vmC, "[2001:db8:99::2]:80", false, ""},
		{"IPv6 host service on the uplink", vmC, "[2001:db8:99::1]:9999", false, ""},
		{"IPv6 host service on its gateway", vmC, "[2001:db8:aaaa:1:3:deca:deca:dec0]:9999", false, ""},
		{"IPv6 published port from outside", internet, "[2001:db8:aaaa:1:3:deca:deca:dec1]:22", true, "2001:db8:99::2"},
		{"IPv6 unpublished port from outside", internet, "[2001:db8:aaaa:1:3:deca:deca:dec1]:8080", false, ""},
		{"IPv4 egress of the IPv6 VM", vmC, "203.0.113.10:80", true, "10.99.0.1"},
	}
	for _, r := range reach {
		seen, err := testenv.Dial(r.from, r.to)
		if r.ok != (err == nil) {
			t.Errorf("%s: reachable=%v, want %v (%v)", r.name, err == nil, r.ok, err)
			continue
		}
		if r.ok && !strings.HasPrefix(seen, r.seenFrom+":") && !strings.HasPrefix(seen, "["+r.seenFrom+"]:") {
			t.Errorf("%s: listener saw %s, want %s", r.name, seen, r.seenFrom)
		}
	}

	// A forbidden network is refused at once, not left to time out.
	if _, err := testenv.Dial(vmA, "169.254.169.254:80"); err == nil || !strings.Contains(err.Error(), "no route to host") {
		t.Errorf("the metadata service is not refused with an ICMP error: %v", err)
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

// TestApplyEveryVMOfThePool writes the table for as many VMs as the
// default pool holds, each with internet and two forwards: one netlink
// batch of tens of thousands of messages.
func TestApplyEveryVMOfThePool(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "nft")
	pool, err := NewPool(testPool, 24, 4)
	if err != nil {
		t.Fatal(err)
	}
	var vms []VMRules
	for i := 4; i < 4096; i++ {
		a, err := pool.At(i)
		if err != nil {
			t.Fatal(err)
		}
		vms = append(vms, VMRules{Tap: a.Tap, MAC: a.MAC(), Guest: a.Guest, Internet: true, Forwards: []Forward{
			{Proto: "tcp", HostPort: uint16(20000 + i), GuestPort: 22}, {Proto: "udp", HostPort: uint16(20000 + i), GuestPort: 53},
		}})
	}
	fw := NewFirewall("up0", testPool)
	t.Cleanup(func() { _ = fw.Remove() })
	start := time.Now()
	if err := fw.Apply(vms); err != nil {
		t.Fatal(err)
	}
	t.Logf("table of %d VMs written in %s", len(vms), time.Since(start).Round(time.Millisecond))
	routes, err := hostRoutes()
	if err != nil {
		t.Fatal(err)
	}
	want := buildTable(tableSpec{uplink: "up0", pool: testPool, vms: vms, blocked: blockedDestinations(routes)}).String()
	if listed := testenv.Cmd(t, "nft", "list", "table", "inet", TableName); listed != want {
		t.Errorf("nft lists %d bytes, other than the %d rendered", len(listed), len(want))
	}
	if err := fw.Apply(vms[:1]); err != nil {
		t.Fatal(err)
	}
	listed := testenv.Cmd(t, "nft", "list", "table", "inet", TableName)
	if n := strings.Count(listed, "chain from_avm"); n != 1 {
		t.Errorf("%d VM chains after shrinking to one VM", n)
	}
}
