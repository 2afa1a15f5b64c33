package network

import (
	"net"
	"net/netip"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.MaybeRunHelper()
	testenv.RunIsolated(m)
}

func TestPoolAddresses(t *testing.T) {
	p, err := NewPool(netip.MustParsePrefix("172.16.0.0/12"), 24, 4)
	if err != nil {
		t.Fatal(err)
	}
	a, err := p.Allocate("vm-a")
	if err != nil {
		t.Fatal(err)
	}
	want := Allocation{Index: 4, Network: netip.MustParsePrefix("172.16.4.0/24"),
		Host: netip.MustParseAddr("172.16.4.1"), Guest: netip.MustParseAddr("172.16.4.2"), Tap: "avm4"}
	if a != want {
		t.Errorf("first allocation %+v, want %+v", a, want)
	}
	if a.MAC().String() != "06:00:ac:10:04:02" || a.HostPrefix().String() != "172.16.4.1/24" {
		t.Errorf("mac %s host %s", a.MAC(), a.HostPrefix())
	}
	last, _ := p.At(4095)
	if last.Network.String() != "172.31.255.0/24" {
		t.Errorf("last network %s", last.Network)
	}
	b, _ := p.Allocate("vm-b")
	p.Release(a.Index)
	c, _ := p.Allocate("vm-c")
	if b.Index != 5 || c.Index != 4 {
		t.Errorf("b %d c %d", b.Index, c.Index)
	}
	if _, err := p.Reserve(5, "vm-x"); err == nil {
		t.Error("reserved an index held by another owner")
	}
	if _, err := p.Reserve(5, "vm-b"); err != nil {
		t.Errorf("re-reserve by its owner: %v", err)
	}
}

func TestPoolExhaustionAndBounds(t *testing.T) {
	p, err := NewPool(netip.MustParsePrefix("10.0.0.0/29"), 30, 0)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := p.Allocate("x"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Allocate("x"); err != ErrPoolExhausted {
		t.Errorf("err = %v", err)
	}
	for _, tc := range []struct {
		pool       string
		bits, from int
	}{{"10.0.0.0/24", 16, 0}, {"10.0.0.0/24", 31, 0}, {"fc00::/64", 124, 0}, {"10.0.0.0/24", 26, 4}} {
		if _, err := NewPool(netip.MustParsePrefix(tc.pool), tc.bits, tc.from); err == nil {
			t.Errorf("%+v accepted", tc)
		}
	}
}

func TestTap(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	host := netip.MustParsePrefix("172.16.9.1/24")
	for range 2 { // a second create replaces the first
		if err := CreateTap("avmtest", host); err != nil {
			t.Fatal(err)
		}
	}
	iface, err := net.InterfaceByName("avmtest")
	if err != nil {
		t.Fatal(err)
	}
	addrs, _ := iface.Addrs()
	if iface.Flags&net.FlagUp == 0 || len(addrs) != 1 || addrs[0].String() != "172.16.9.1/24" {
		t.Errorf("tap %+v addrs %v", iface, addrs)
	}
	if n, err := GuestPackets("avmtest"); n != 0 || err != nil {
		t.Errorf("packets from a guest that is not there: %d %v", n, err)
	}
	if err := DeleteTap("avmtest"); err != nil {
		t.Fatal(err)
	}
	if _, err := GuestPackets("avmtest"); err == nil {
		t.Error("packets counted on a tap that is gone")
	}
	if err := DeleteTap("avmtest"); err != nil {
		t.Errorf("second delete: %v", err)
	}
	if _, err := net.InterfaceByName("avmtest"); err == nil {
		t.Error("tap still there")
	}
}

func TestStaticIPv6(t *testing.T) {
	pool := netip.MustParsePrefix("fc00:1:2:3::/64")
	network, host, guest, err := StaticIPv6(pool, 3, "decadecadecadecadecadecadecadecadecadecadecadecadecadecadecadeca")
	if err != nil {
		t.Fatal(err)
	}
	if network.String() != "fc00:1:2:3:3:deca:deca:dec0/124" || host.String() != "fc00:1:2:3:3:deca:deca:dec0" || guest.String() != "fc00:1:2:3:3:deca:deca:dec1" {
		t.Errorf("%s %s %s", network, host, guest)
	}
	for _, bad := range []struct {
		pool string
		typ  int
		hash string
	}{{"fc00::/96", 1, "decadecadeca"}, {"172.16.0.0/12", 1, "decadecadeca"}, {"fc00::/64", 7, "decadecadeca"}, {"fc00::/64", 1, "QmPxCe3eHVCdTG5u"}, {"fc00::/64", 1, "abc"}} {
		if _, _, _, err := StaticIPv6(netip.MustParsePrefix(bad.pool), bad.typ, bad.hash); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestUsableResolvers(t *testing.T) {
	got := usable([]string{"127.0.0.53", "9.9.9.9", "Link", "2:", "[2620:fe::fe]", "9.9.9.9", "::1"})
	if len(got) != 2 || got[0].String() != "9.9.9.9" || got[1].String() != "2620:fe::fe" {
		t.Errorf("%v", got)
	}
}
