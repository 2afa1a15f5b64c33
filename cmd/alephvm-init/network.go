package main

import (
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// configureNetwork sets the hostname, writes /etc/hostname, /etc/hosts
// and /etc/resolv.conf, and configures lo and the interface over netlink.
func (in *Init) configureNetwork() error {
	cfg := in.cfg
	if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
		return fmt.Errorf("set hostname: %w", err)
	}
	for file, content := range etcFiles(cfg) {
		os.Remove(file) // it may be a symlink into /run
		if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
			return err
		}
	}
	in.trace("hostname and /etc files written")
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	in.trace("lo up")
	if cfg.Network == nil {
		return nil
	}
	return configureInterface(*cfg.Network)
}

// etcFiles returns the contents of the files that name the VM and its
// resolvers.
func etcFiles(cfg guest.Config) map[string]string {
	var hosts strings.Builder
	hosts.WriteString("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	var resolv strings.Builder
	if n := cfg.Network; n != nil {
		fmt.Fprintf(&hosts, "%s\t%s\n", n.Address.Addr(), cfg.Hostname)
		if n.Address6.IsValid() {
			fmt.Fprintf(&hosts, "%s\t%s\n", n.Address6.Addr(), cfg.Hostname)
		}
		for _, ns := range n.DNS {
			fmt.Fprintf(&resolv, "nameserver %s\n", ns)
		}
	} else {
		fmt.Fprintf(&hosts, "127.0.1.1\t%s\n", cfg.Hostname)
	}
	return map[string]string{
		"/etc/hostname":    cfg.Hostname + "\n",
		"/etc/hosts":       hosts.String(),
		"/etc/resolv.conf": resolv.String(),
	}
}

func configureInterface(n guest.Network) error {
	name := n.Interface
	if name == "" {
		name = "eth0"
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("network interface %s: %w", name, err)
	}
	if n.MTU != 0 {
		if err := netlink.LinkSetMTU(link, n.MTU); err != nil {
			return fmt.Errorf("%s mtu %d: %w", name, n.MTU, err)
		}
	}
	addr4 := &netlink.Addr{IPNet: &net.IPNet{IP: n.Address.Addr().AsSlice(), Mask: net.CIDRMask(n.Address.Bits(), 32)}}
	if err := netlink.AddrAdd(link, addr4); err != nil {
		return fmt.Errorf("%s address %s: %w", name, n.Address, err)
	}
	if n.Address6.IsValid() {
		// No duplicate address detection: the address is the host's to give,
		// and DAD would delay it by about a second.
		addr6 := &netlink.Addr{IPNet: &net.IPNet{IP: n.Address6.Addr().AsSlice(), Mask: net.CIDRMask(n.Address6.Bits(), 128)}, Flags: unix.IFA_F_NODAD}
		if err := netlink.AddrAdd(link, addr6); err != nil {
			return fmt.Errorf("%s address %s: %w", name, n.Address6, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	if n.Gateway.IsValid() {
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: n.Gateway.AsSlice()}); err != nil {
			return fmt.Errorf("default route via %s: %w", n.Gateway, err)
		}
	}
	if n.Gateway6.IsValid() {
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: n.Gateway6.AsSlice()}); err != nil {
			return fmt.Errorf("default route via %s: %w", n.Gateway6, err)
		}
	}
	return nil
}
