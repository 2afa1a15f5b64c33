package network

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Uplink returns the name of the interface of the default IPv4 route.
func Uplink() (string, error) {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: 254}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return "", fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() {
			link, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				return "", fmt.Errorf("default route's interface: %w", err)
			}
			return link.Attrs().Name, nil
		}
	}
	return "", errors.New("no default IPv4 route: set the uplink interface explicitly")
}

// EnableForwarding turns on IPv4 forwarding, without which VMs reach
// nothing beyond the host.
func EnableForwarding() error {
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	return nil
}

// EnableIPv6Forwarding makes the host route IPv6 between its uplink and
// the VMs' taps, and answer neighbour solicitations for the addresses it
// proxies on the uplink (ndpProxy).
func EnableIPv6Forwarding(uplink string, ndpProxy bool) error {
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/all/forwarding", []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable IPv6 forwarding: %w", err)
	}
	if ndpProxy {
		if err := os.WriteFile(fmt.Sprintf("/proc/sys/net/ipv6/conf/%s/proxy_ndp", uplink), []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("enable NDP proxying on %s: %w", uplink, err)
		}
	}
	return nil
}

// Taps lists the VM taps present on the host.
func Taps() ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []string
	for _, l := range links {
		if name := l.Attrs().Name; strings.HasPrefix(name, tapPrefix) && l.Type() == "tuntap" {
			out = append(out, name)
		}
	}
	return out, nil
}

// HostResolvers returns the DNS servers guests should use: the host's
// upstream servers. A local stub (127.0.0.53 of systemd-resolved) is useless
// to a guest, so resolvectl is asked for the real ones; resolv.conf is the
// fallback. Nothing is written anywhere: the list goes into each guest's
// own configuration.
func HostResolvers() ([]netip.Addr, error) {
	if out, err := exec.Command("resolvectl", "dns").Output(); err == nil {
		if addrs := usable(strings.Fields(strings.ReplaceAll(string(out), ":", " : "))); len(addrs) > 0 {
			return addrs, nil
		}
	}
	f, err := os.Open("/etc/resolv.conf")
	if err != nil {
		return nil, fmt.Errorf("read resolvers: %w", err)
	}
	defer f.Close()
	var fields []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if parts := strings.Fields(sc.Text()); len(parts) >= 2 && parts[0] == "nameserver" {
			fields = append(fields, parts[1])
		}
	}
	addrs := usable(fields)
	if len(addrs) == 0 {
		return nil, errors.New("no usable DNS server in resolvectl or /etc/resolv.conf: set them explicitly")
	}
	return addrs, nil
}

// usable keeps the addresses among words that a guest can reach.
func usable(words []string) []netip.Addr {
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, w := range words {
		a, err := netip.ParseAddr(strings.Trim(w, "[]"))
		if err != nil || a.IsLoopback() || a.IsUnspecified() || seen[a] {
			continue
		}
		seen[a] = true
		out = append(out, a)
	}
	return out
}

// StaticIPv6 returns a VM's IPv6 network as the reference computes it from
// its item hash: the pool's first four hextets, the VM type digit (1
// program, 2 persistent program, 3 instance), then hash[0:4], hash[4:8] and
// hash[8:11]+"0", as a /124. The host is the network's first address, the
// guest the next; the address is the same on any node.
func StaticIPv6(pool netip.Prefix, vmType int, hash string) (network netip.Prefix, host, guest netip.Addr, err error) {
	if !pool.Addr().Is6() || pool.Bits() > 64 {
		return netip.Prefix{}, netip.Addr{}, netip.Addr{}, fmt.Errorf("IPv6 pool %s: want a /64 or larger", pool)
	}
	if vmType < 1 || vmType > 3 || len(hash) < 11 {
		return netip.Prefix{}, netip.Addr{}, netip.Addr{}, fmt.Errorf("no static IPv6 for VM type %d and hash %q", vmType, hash)
	}
	b := pool.Masked().Addr().As16()
	text := fmt.Sprintf("%x:%x:%x:%x:%x:%s:%s:%s0",
		uint16(b[0])<<8|uint16(b[1]), uint16(b[2])<<8|uint16(b[3]), uint16(b[4])<<8|uint16(b[5]), uint16(b[6])<<8|uint16(b[7]),
		vmType, hash[0:4], hash[4:8], hash[8:11])
	addr, err := netip.ParseAddr(text)
	if err != nil {
		return netip.Prefix{}, netip.Addr{}, netip.Addr{}, fmt.Errorf("static IPv6 of %q: %w", hash, err)
	}
	network = netip.PrefixFrom(addr, 124)
	return network, addr, addr.Next(), nil
}

// hostRoutes returns the destinations of the host's unicast routes in
// every routing table but the local one, other than default routes and
// routes to VM taps: the networks the operator's host reaches besides the
// internet.
func hostRoutes() ([]netip.Prefix, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	taps := map[int]bool{}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, tapPrefix) {
			taps[l.Attrs().Index] = true
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	var out []netip.Prefix
	for _, r := range routes {
		if r.Table == unix.RT_TABLE_LOCAL || r.Type != unix.RTN_UNICAST || r.Dst == nil || taps[r.LinkIndex] {
			continue
		}
		addr, ok := netip.AddrFromSlice(r.Dst.IP)
		ones, bits := r.Dst.Mask.Size()
		if addr.Is4In6() && bits == 128 {
			ones -= 96
		}
		if !ok || ones <= 0 {
			continue
		}
		out = append(out, netip.PrefixFrom(addr.Unmap(), ones))
	}
	return out, nil
}
