package network

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// CreateTap creates a persistent tap device named name with the host's
// address hostAddr (with its prefix) and brings it up. A leftover tap of
// the same name is replaced, so a repeated call converges.
func CreateTap(name string, hostAddr netip.Prefix) error {
	if err := DeleteTap(name); err != nil {
		return err
	}
	tap := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
	}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("create tap %s: %w", name, err)
	}
	// The kernel keeps the device after the creating descriptors close,
	// because it was created persistent; ours are not needed.
	for _, f := range tap.Fds {
		f.Close()
	}
	ok := false
	defer func() {
		if !ok {
			_ = DeleteTap(name)
		}
	}()
	if err := hardenTap(name); err != nil {
		return err
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find tap %s: %w", name, err)
	}
	if err := setTapAddress(link, name, hostAddr); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up tap %s: %w", name, err)
	}
	ok = true
	return nil
}

// DeleteTap removes the tap named name, and with it its addresses and
// routes. A tap that does not exist is not an error.
func DeleteTap(name string) error {
	link, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find tap %s: %w", name, err)
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("delete tap %s: %w", name, err)
	}
	return nil
}

// tapSysctls are the kernel settings of a VM's tap, behind the firewall's
// own checks: strict reverse-path filtering drops IPv4 packets (and ARP
// requests) whose source the host would not route back through this tap;
// the host takes no router advertisement nor redirect from a guest, which
// could otherwise give the host a route through the guest.
var tapSysctls = []struct {
	path, value string
	ipv6        bool // absent when the host runs without IPv6
}{
	{"ipv4/conf/%s/rp_filter", "1", false},
	{"ipv4/conf/%s/accept_redirects", "0", false},
	{"ipv6/conf/%s/accept_ra", "0", true},
	{"ipv6/conf/%s/accept_redirects", "0", true},
}

// sysctlRoot is where the kernel's network settings are.
const sysctlRoot = "/proc/sys/net"

// hardenTap applies tapSysctls to the tap named name.
func hardenTap(name string) error {
	for _, s := range tapSysctls {
		path := filepath.Join(sysctlRoot, fmt.Sprintf(s.path, name))
		err := os.WriteFile(path, []byte(s.value+"\n"), 0o644)
		if s.ipv6 && errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("tap %s: set %s: %w", name, path, err)
		}
	}
	return nil
}

// addTapAddress sets addr on the tap named name (again, after a restart).
func addTapAddress(name string, addr netip.Prefix) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find tap %s: %w", name, err)
	}
	return setTapAddress(link, name, addr)
}

// setTapAddress sets addr on the tap link. An IPv6 address skips
// duplicate address detection: the tap's link holds only the host and
// its guest.
func setTapAddress(link netlink.Link, name string, addr netip.Prefix) error {
	a, err := netlink.ParseAddr(addr.String())
	if err != nil {
		return fmt.Errorf("tap %s address %s: %w", name, addr, err)
	}
	if addr.Addr().Is6() {
		a.Flags |= unix.IFA_F_NODAD
	}
	if err := netlink.AddrReplace(link, a); err != nil {
		return fmt.Errorf("set address %s on tap %s: %w", addr, name, err)
	}
	return nil
}

// pinNeighbours records the guest's addresses on the tap as permanent
// neighbours with the NIC's MAC: the host never waits for the guest to
// answer ARP or neighbour solicitation. A guest slow to answer (under
// load, as an emulated one often is) otherwise left a connection made
// right after its start with "no route to host" once the kernel's three
// probes had gone unanswered. The entries go with the tap.
func pinNeighbours(tap string, mac net.HardwareAddr, addrs ...netip.Addr) error {
	link, err := netlink.LinkByName(tap)
	if err != nil {
		return fmt.Errorf("find tap %s: %w", tap, err)
	}
	for _, a := range addrs {
		if !a.IsValid() {
			continue
		}
		family := unix.AF_INET
		if a.Is6() {
			family = unix.AF_INET6
		}
		n := &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: family, State: netlink.NUD_PERMANENT, IP: net.IP(a.AsSlice()), HardwareAddr: mac}
		if err := netlink.NeighSet(n); err != nil {
			return fmt.Errorf("neighbour %s at %s on tap %s: %w", a, mac, tap, err)
		}
	}
	return nil
}

// proxyNDP adds (or removes) a proxy neighbour entry for addr on the
// uplink, so that the host answers the link's neighbour solicitations for
// a guest: for IPv6 pools routed on the uplink's link.
func proxyNDP(uplink string, addr netip.Addr, add bool) error {
	link, err := netlink.LinkByName(uplink)
	if err != nil {
		return fmt.Errorf("NDP proxy: find uplink %q: %w", uplink, err)
	}
	n := &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: unix.AF_INET6, Flags: netlink.NTF_PROXY, IP: net.IP(addr.AsSlice())}
	if add {
		if err := netlink.NeighSet(n); err != nil {
			return fmt.Errorf("NDP proxy for %s on %s: %w", addr, uplink, err)
		}
		return nil
	}
	if err := netlink.NeighDel(n); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove the NDP proxy for %s on %s: %w", addr, uplink, err)
	}
	return nil
}

// GuestPackets returns the packets the tap named name has received: those
// its VM's guest sent.
func GuestPackets(name string) (uint64, error) {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return 0, fmt.Errorf("find tap %s: %w", name, err)
	}
	st := link.Attrs().Statistics
	if st == nil {
		return 0, fmt.Errorf("tap %s has no statistics", name)
	}
	return st.RxPackets, nil
}
