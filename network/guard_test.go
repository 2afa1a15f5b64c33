package network

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestGuestTrafficFrames plays the guests from the test itself: it opens
// the VMs' real taps as a hypervisor does and writes Ethernet frames into
// them, and watches what leaves by the uplink and by another interface of
// the host (raw packet sockets) and what reaches a service of the host.
// Each frame carries a marker in its payload. Before the table is written
// the same kinds of frames get through, so the checks after it are not
// vacuous.
func TestGuestTrafficFrames(t *testing.T) {
	testNode(t)
	vms := testVMs(t)
	taps := map[string]*guestTap{}
	for _, vm := range vms {
		if err := CreateTap(vm.Tap, vm.host); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = DeleteTap(vm.Tap) })
		if vm.host6.IsValid() {
			if out, err := execIP("addr", "add", vm.host6.String(), "dev", vm.Tap, "nodad"); err != nil {
				t.Fatal(err, out)
			}
		}
		taps[vm.Tap] = openGuestTap(t, vm.VMRules)
	}
	a, b, c := taps["avm4"], taps["avm5"], taps["avm6"]

	for _, tap := range []string{"avm4", "avm5", "avm6"} {
		for _, s := range []struct{ path, want string }{
			{"ipv4/conf/" + tap + "/rp_filter", "1"}, {"ipv4/conf/" + tap + "/accept_redirects", "0"},
			{"ipv6/conf/" + tap + "/accept_ra", "0"}, {"ipv6/conf/" + tap + "/accept_redirects", "0"},
		} {
			if got, err := os.ReadFile("/proc/sys/net/" + s.path); err != nil || strings.TrimSpace(string(got)) != s.want {
				t.Errorf("%s = %q, want %s (%v)", s.path, got, s.want, err)
			}
		}
	}

	uplink, other := capture(t, "up0"), capture(t, "lan0")
	local := listenLocal(t, 7777)
	public, public6 := netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8:ff::10")
	foreignMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}

	type probe struct {
		name  string
		tap   *guestTap
		frame func(marker string) []byte
		where string // where the frame shows: "up0", "lan0", "local" or "" (nowhere)
	}
	// run writes each probe's frame, then a frame that must leave by the
	// uplink; once that one is seen, and a little after, what was seen is
	// what will be.
	run := func(phase string, probes []probe) {
		t.Helper()
		for _, p := range probes {
			p.tap.write(t, p.frame(phase+"/"+p.name))
		}
		sentinel := phase + "/sentinel"
		a.write(t, a.udp4(a.vm.Guest, public, 9, sentinel))
		if !uplink.waitFor(sentinel, 5*time.Second) {
			t.Fatalf("%s: the sentinel frame never left by the uplink", phase)
		}
		time.Sleep(300 * time.Millisecond)
		for _, p := range probes {
			marker := phase + "/" + p.name
			seen := map[string]bool{"up0": uplink.saw(marker), "lan0": other.saw(marker), "local": local.saw(marker)}
			for where, ok := range seen {
				if ok != (where == p.where) {
					t.Errorf("%s: %s: seen on %s: %v, want %v", phase, p.name, where, ok, where == p.where)
				}
			}
		}
	}

	// Without the table: the host's own routing, and the taps' rp_filter.
	run("no table", []probe{
		{"legit egress", a, func(m string) []byte { return a.udp4(a.vm.Guest, public, 9, m) }, "up0"},
		{"to a host service", a, func(m string) []byte { return a.udp4(a.vm.Guest, a.vm.host.Addr(), 7777, m) }, "local"},
		{"to another interface's network", a, func(m string) []byte { return a.udp4(a.vm.Guest, netip.MustParseAddr("192.168.50.2"), 9, m) }, "lan0"},
		{"to the metadata service", a, func(m string) []byte { return a.udp4(a.vm.Guest, netip.MustParseAddr("169.254.169.254"), 80, m) }, "up0"},
		{"foreign source, rp_filter", a, func(m string) []byte { return a.udp4(netip.MustParseAddr("8.8.8.8"), public, 9, m) }, ""},
		{"foreign MAC", a, func(m string) []byte { return a.withMAC(foreignMAC, a.udp4(a.vm.Guest, public, 9, m)) }, "up0"},
		{"IPv6 from a VM without IPv6", a, func(m string) []byte {
			return a.udp6(netip.MustParseAddr("2001:db8:aaaa:1:3::5"), public6, 9, m)
		}, "up0"},
		{"IPv6 egress", c, func(m string) []byte { return c.udp6(c.vm.Guest6, public6, 9, m) }, "up0"},
		{"IPv6 link-local to a host service", c, func(m string) []byte {
			return c.udp6(c.linkLocal(), c.hostLinkLocal(t), 7777, m)
		}, "local"},
	})
	if !c.neighborAdvertised(t, c.hostLinkLocal(t)) {
		t.Error("no table: the host answers no neighbour solicitation")
	}
	// rp_filter off, the nftables guard alone must stop forged sources.
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/avm4/rp_filter", []byte("0"), 0o644); err != nil {
		t.Fatal(err)
	}
	run("rp_filter off", []probe{
		{"foreign source", a, func(m string) []byte { return a.udp4(netip.MustParseAddr("8.8.8.8"), public, 9, m) }, "up0"},
	})

	fw := NewFirewall("up0", testPool)
	if err := fw.SetEgress(testEgress); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fw.Remove() })
	if err := fw.Apply(rulesOf(vms)); err != nil {
		t.Fatal(err)
	}
	checkListed(t)

	addr := netip.MustParseAddr
	run("table", []probe{
		{"legit egress", a, func(m string) []byte { return a.udp4(a.vm.Guest, public, 9, m) }, "up0"},
		{"foreign source", a, func(m string) []byte { return a.udp4(addr("8.8.8.8"), public, 9, m) }, ""},
		{"another VM's source", a, func(m string) []byte { return a.udp4(b.vm.Guest, public, 9, m) }, ""},
		{"own network's other source", a, func(m string) []byte { return a.udp4(addr("172.16.4.3"), public, 9, m) }, ""},
		{"the host's source", a, func(m string) []byte { return a.udp4(a.vm.host.Addr(), public, 9, m) }, ""},
		{"foreign MAC", a, func(m string) []byte { return a.withMAC(foreignMAC, a.udp4(a.vm.Guest, public, 9, m)) }, ""},
		{"another VM's MAC", a, func(m string) []byte { return a.withMAC(b.vm.MAC, a.udp4(a.vm.Guest, public, 9, m)) }, ""},
		{"another VM's MAC and source", a, func(m string) []byte { return a.withMAC(b.vm.MAC, a.udp4(b.vm.Guest, public, 9, m)) }, ""},
		{"to the metadata service", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("169.254.169.254"), 80, m) }, ""},
		{"to the uplink's network", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("10.99.0.2"), 80, m) }, ""},
		{"to a network routed through the uplink", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("198.51.100.10"), 9, m) }, ""},
		{"to another interface's network", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("192.168.50.2"), 9, m) }, ""},
		{"to a private network by the default route", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("10.200.0.1"), 9, m) }, ""},
		{"to an allowed network", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("192.0.2.10"), 9, m) }, "up0"},
		{"to the DNS server", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("10.99.0.2"), 53, m) }, "up0"},
		{"to the DNS server's other port", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("10.99.0.2"), 54, m) }, ""},
		{"to a host service on the gateway", a, func(m string) []byte { return a.udp4(a.vm.Guest, a.vm.host.Addr(), 7777, m) }, ""},
		{"to a host service on the uplink", a, func(m string) []byte { return a.udp4(a.vm.Guest, addr("10.99.0.1"), 7777, m) }, ""},
		{"to a host service on another gateway", a, func(m string) []byte { return a.udp4(a.vm.Guest, b.vm.host.Addr(), 7777, m) }, ""},
		{"IPv6 from a VM without IPv6", a, func(m string) []byte { return a.udp6(addr("2001:db8:aaaa:1:3::5"), public6, 9, m) }, ""},
		{"IPv6 with the IPv6 VM's source", a, func(m string) []byte { return a.udp6(c.vm.Guest6, public6, 9, m) }, ""},
		{"IPv6 link-local from a VM without IPv6", a, func(m string) []byte {
			return a.udp6(a.linkLocal(), a.hostLinkLocal(t), 7777, m)
		}, ""},
		{"egress without internet", b, func(m string) []byte { return b.udp4(b.vm.Guest, public, 9, m) }, ""},

		{"IPv6 egress", c, func(m string) []byte { return c.udp6(c.vm.Guest6, public6, 9, m) }, "up0"},
		{"IPv4 egress of the IPv6 VM", c, func(m string) []byte { return c.udp4(c.vm.Guest, public, 9, m) }, "up0"},
		{"IPv6 foreign source", c, func(m string) []byte { return c.udp6(addr("2001:db8:ff::99"), public6, 9, m) }, ""},
		{"IPv6 own network's other source", c, func(m string) []byte { return c.udp6(c.vm.Guest6.Next(), public6, 9, m) }, ""},
		{"IPv6 link-local source to the internet", c, func(m string) []byte { return c.udp6(c.linkLocal(), public6, 9, m) }, ""},
		{"IPv6 foreign MAC", c, func(m string) []byte { return c.withMAC(foreignMAC, c.udp6(c.vm.Guest6, public6, 9, m)) }, ""},
		{"IPv6 to the uplink's network", c, func(m string) []byte { return c.udp6(c.vm.Guest6, addr("2001:db8:99::2"), 9, m) }, ""},
		{"IPv6 to a unique local network", c, func(m string) []byte { return c.udp6(c.vm.Guest6, addr("fd00::1"), 9, m) }, ""},
		{"IPv6 to a host service on the uplink", c, func(m string) []byte { return c.udp6(c.vm.Guest6, addr("2001:db8:99::1"), 7777, m) }, ""},
		{"IPv6 to a host service on the gateway", c, func(m string) []byte { return c.udp6(c.vm.Guest6, c.vm.host6.Addr(), 7777, m) }, ""},
		{"IPv6 link-local to a host service", c, func(m string) []byte {
			return c.udp6(c.linkLocal(), c.hostLinkLocal(t), 7777, m)
		}, ""},
	})
	// Neighbour discovery still works for the VM with IPv6, and only for it.
	if !c.neighborAdvertised(t, c.hostLinkLocal(t)) || !c.neighborAdvertised(t, c.vm.host6.Addr()) {
		t.Error("table: the host answers no neighbour solicitation of the VM with IPv6")
	}
	if a.neighborAdvertised(t, a.hostLinkLocal(t)) {
		t.Error("table: the host answers neighbour solicitations of a VM without IPv6")
	}
}

func execIP(args ...string) (string, error) {
	out, err := exec.Command("ip", args...).CombinedOutput()
	return string(out), err
}

// guestTap is a VM's tap opened as its hypervisor would.
type guestTap struct {
	vm     testVM
	f      *os.File
	tapMAC net.HardwareAddr // the host's end: where the guest sends
}

func openGuestTap(t testing.TB, rules VMRules) *guestTap {
	t.Helper()
	var vm testVM
	for _, v := range testVMs(t) {
		if v.Tap == rules.Tap {
			vm = v
		}
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Skipf("no tun device: %v", err)
	}
	ifr, err := unix.NewIfreq(rules.Tap)
	if err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		t.Fatalf("attach to tap %s: %v", rules.Tap, err)
	}
	f := os.NewFile(uintptr(fd), rules.Tap)
	t.Cleanup(func() { f.Close() })
	iface, err := net.InterfaceByName(rules.Tap)
	if err != nil {
		t.Fatal(err)
	}
	return &guestTap{vm: vm, f: f, tapMAC: iface.HardwareAddr}
}

func (g *guestTap) write(t testing.TB, frame []byte) {
	t.Helper()
	if _, err := g.f.Write(frame); err != nil {
		t.Fatalf("write a frame into %s: %v", g.vm.Tap, err)
	}
}

// linkLocal is the guest's EUI-64 link-local address.
func (g *guestTap) linkLocal() netip.Addr { return eui64(g.vm.MAC) }

// hostLinkLocal is the host's link-local address on the tap, which the
// kernel adds on its own a moment after the tap's carrier comes up (when
// the test opened it): it is waited for.
func (g *guestTap) hostLinkLocal(t *testing.T) netip.Addr {
	t.Helper()
	iface, err := net.InterfaceByName(g.vm.Tap)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		addrs, _ := iface.Addrs()
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().IsLinkLocalUnicast() {
				return p.Addr().WithZone("")
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("tap %s has no link-local address after 5 s", g.vm.Tap)
		}
	}
}

func eui64(mac net.HardwareAddr) netip.Addr {
	b := [16]byte{0: 0xfe, 1: 0x80, 8: mac[0] ^ 2, 9: mac[1], 10: mac[2], 11: 0xff, 12: 0xfe, 13: mac[3], 14: mac[4], 15: mac[5]}
	return netip.AddrFrom16(b)
}

func (g *guestTap) ether(typ uint16, payload []byte) []byte {
	frame := append(append(append([]byte{}, g.tapMAC...), g.vm.MAC...), byte(typ>>8), byte(typ))
	return append(frame, payload...)
}

// withMAC rewrites a frame's source MAC.
func (g *guestTap) withMAC(mac net.HardwareAddr, frame []byte) []byte {
	copy(frame[6:12], mac)
	return frame
}

func (g *guestTap) udp4(src, dst netip.Addr, dport uint16, marker string) []byte {
	udp := udpDatagram(src, dst, dport, []byte(markerPrefix+marker))
	ip := make([]byte, 20)
	ip[0], ip[8], ip[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // don't fragment
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(ip))
	return g.ether(unix.ETH_P_IP, append(ip, udp...))
}

func (g *guestTap) udp6(src, dst netip.Addr, dport uint16, marker string) []byte {
	return g.ether(unix.ETH_P_IPV6, ipv6Packet(src, dst, unix.IPPROTO_UDP, 64, udpDatagram(src, dst, dport, []byte(markerPrefix+marker))))
}

func ipv6Packet(src, dst netip.Addr, next byte, hops byte, payload []byte) []byte {
	ip := make([]byte, 40)
	ip[0], ip[6], ip[7] = 0x60, next, hops
	binary.BigEndian.PutUint16(ip[4:], uint16(len(payload)))
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(ip, payload...)
}

func udpDatagram(src, dst netip.Addr, dport uint16, payload []byte) []byte {
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...)
	binary.BigEndian.PutUint16(udp[6:], l4Checksum(src, dst, unix.IPPROTO_UDP, udp))
	return udp
}

// l4Checksum is the checksum of a UDP or ICMPv6 message with its
// pseudo-header.
func l4Checksum(src, dst netip.Addr, proto byte, msg []byte) uint16 {
	var pseudo []byte
	pseudo = append(pseudo, src.AsSlice()...)
	pseudo = append(pseudo, dst.AsSlice()...)
	if src.Is4() {
		pseudo = append(pseudo, 0, proto, byte(len(msg)>>8), byte(len(msg)))
	} else {
		pseudo = append(pseudo, 0, 0, byte(len(msg)>>8), byte(len(msg)), 0, 0, 0, proto)
	}
	sum := checksum(append(pseudo, msg...))
	if sum == 0 && proto == unix.IPPROTO_UDP {
		sum = 0xffff
	}
	return sum
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// neighborAdvertised sends a neighbour solicitation for target from the
// guest's link-local address and reports whether the host answers it.
func (g *guestTap) neighborAdvertised(t *testing.T, target netip.Addr) bool {
	t.Helper()
	src := g.linkLocal()
	ns := make([]byte, 24, 32)
	ns[0] = 135
	tb := target.As16()
	copy(ns[8:], tb[:])
	ns = append(ns, 1, 1) // source link-layer address option
	ns = append(ns, g.vm.MAC...)
	binary.BigEndian.PutUint16(ns[2:], l4Checksum(src, target, unix.IPPROTO_ICMPV6, ns))
	g.write(t, g.ether(unix.ETH_P_IPV6, ipv6Packet(src, target, unix.IPPROTO_ICMPV6, 255, ns)))
	deadline := time.Now().Add(time.Second)
	buf := make([]byte, 2048)
	for {
		_ = g.f.SetReadDeadline(deadline)
		n, err := g.f.Read(buf)
		if err != nil {
			return false
		}
		f := buf[:n]
		// An IPv6 neighbour advertisement for target.
		if n >= 14+40+24 && binary.BigEndian.Uint16(f[12:]) == unix.ETH_P_IPV6 && f[14+6] == unix.IPPROTO_ICMPV6 &&
			f[14+40] == 136 && bytes.Equal(f[14+40+8:14+40+24], tb[:]) {
			return true
		}
	}
}

// packetLog records the markers seen by a packet socket or a service.
type packetLog struct {
	mu   sync.Mutex
	seen map[string]bool
}

const markerPrefix = "avmtest:"

func (l *packetLog) record(data []byte) {
	i := bytes.Index(data, []byte(markerPrefix))
	if i < 0 {
		return
	}
	l.mu.Lock()
	l.seen[string(data[i+len(markerPrefix):])] = true
	l.mu.Unlock()
}

func (l *packetLog) saw(marker string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seen[marker]
}

func (l *packetLog) waitFor(marker string, timeout time.Duration) bool {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if l.saw(marker) {
			return true
		}
	}
	return false
}

// capture records the markers of the frames leaving (or entering) by the
// interface named name.
func capture(t *testing.T, name string) *packetLog {
	t.Helper()
	iface, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatal(err)
	}
	proto := int(htons(unix.ETH_P_ALL))
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: iface.Index}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	l := &packetLog{seen: map[string]bool{}}
	done := make(chan struct{})
	var stopped sync.WaitGroup
	stopped.Add(1)
	go func() {
		defer stopped.Done()
		buf := make([]byte, 65536)
		for {
			select {
			case <-done:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err == nil {
				l.record(buf[:n])
			}
		}
	}()
	t.Cleanup(func() { close(done); stopped.Wait(); unix.Close(fd) })
	return l
}

// listenLocal records the markers of the datagrams that reach a UDP
// service of the host on port, over IPv4 and IPv6.
func listenLocal(t *testing.T, port int) *packetLog {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{Port: port})
	if err != nil {
		t.Fatal(err)
	}
	l := &packetLog{seen: map[string]bool{}}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, _, err := c.ReadFrom(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			l.record(buf[:n])
		}
	}()
	t.Cleanup(func() { c.Close() })
	return l
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
