package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TableName is the nftables table the node owns. Nothing else is touched:
// the rules of every VM live in this one inet table.
const TableName = "alephvm"

// tapPrefix starts every VM tap's name; the firewall matches it as a
// wildcard ("avm*").
const tapPrefix = "avm"

// VMRules is what the firewall must do for one VM.
type VMRules struct {
	Tap      string
	MAC      net.HardwareAddr // the guest NIC's: frames from another are dropped
	Guest    netip.Addr       // the guest's IPv4 address
	Guest6   netip.Addr       // the guest's IPv6 address; invalid when it has none
	Internet bool             // the VM may open connections to the outside world
	Forwards []Forward
}

// Forward maps a port of the host to a port of a VM.
type Forward struct {
	Proto     string `json:"proto"` // "tcp" or "udp"
	HostPort  uint16 `json:"host_port"`
	GuestPort uint16 `json:"guest_port"`
}

// Egress is what VMs with internet may reach through the uplink besides
// the public internet.
type Egress struct {
	// Allowed lists networks the VMs may reach although they are private,
	// link-local or routed by the host other than by its default route.
	Allowed []netip.Prefix
	// DNS lists the resolvers the guests are given: reachable on port 53
	// wherever they are.
	DNS []netip.Addr
}

// Firewall writes the node's nftables table.
type Firewall struct {
	uplink string       // the interface towards the outside world
	pool   netip.Prefix // every VM address is in it
	mu     sync.Mutex
	egress Egress
}

// NewFirewall returns a firewall for VMs in pool reaching the outside
// world through uplink.
func NewFirewall(uplink string, pool netip.Prefix) *Firewall {
	return &Firewall{uplink: uplink, pool: pool.Masked()}
}

// SetEgress sets the exceptions to what VMs may not reach; it takes
// effect at the next Apply.
func (f *Firewall) SetEgress(e Egress) error {
	var errs []error
	for _, p := range e.Allowed {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("allowed network %v is not a prefix", p))
		} else if p != p.Masked() {
			errs = append(errs, fmt.Errorf("allowed network %s has bits set past its length (%s?)", p, p.Masked()))
		}
	}
	for _, a := range e.DNS {
		if !a.IsValid() || a.Is4In6() {
			errs = append(errs, fmt.Errorf("DNS server %v: want an IPv4 or IPv6 address", a))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.egress = Egress{Allowed: slices.Clone(e.Allowed), DNS: slices.Clone(e.DNS)}
	return nil
}

// Apply replaces the node's table with the rules for vms, in one netlink
// transaction: there is no moment without rules, and established
// connections are kept.
//
// The table holds:
//   - prerouting (nat): each port forward, from any interface but a VM's,
//     DNATed to its VM;
//   - output (nat): the same forwards for connections the node itself
//     opens to one of its own addresses;
//   - postrouting (nat): masquerade of VM traffic leaving by the uplink;
//   - guard (filter, before conntrack) and a chain per VM (from_TAP, found
//     through the map "taps"): what comes in from a tap must carry the VM's
//     own MAC and IPv4 (or IPv6) source address, else it is dropped; so is
//     everything from a tap of no VM;
//   - forward (filter): established traffic, each VM's egress to the uplink
//     when it has internet (through the map "internet" to the egress chain),
//     and forwarded ports into each VM (through the map "published" to its
//     to_TAP chain); every other packet from or to a VM is dropped, so VMs
//     cannot reach each other nor the host's other networks;
//   - egress: the guests' DNS servers and the allowed networks, then no
//     private, link-local, loopback, multicast or reserved range and no
//     network the host has a route to other than its default route;
//   - input (filter): a VM may answer the host but not open connections to
//     any of the host's own services (IPv6 neighbour discovery aside).
//
// The base chains' policy is accept: traffic that is not a VM's is left to
// the host's own rules.
func (f *Firewall) Apply(vms []VMRules) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := validateAll(vms); err != nil {
		return err
	}
	routes, err := hostRoutes()
	if err != nil {
		return err
	}
	t := buildTable(tableSpec{
		uplink: f.uplink, pool: f.pool, vms: vms,
		blocked: blockedDestinations(routes), allowed: f.egress.Allowed, dns: f.egress.DNS,
	})
	messages := 1
	for _, m := range t.maps {
		messages += 1 + len(m.keys)/256 + 1
	}
	for _, c := range t.chains {
		messages += 1 + len(c.rules)
	}
	conn, table, err := deleteTable(messages)
	if err != nil {
		return err
	}
	conn.AddTable(table)
	chains := map[*nftChain]*nftables.Chain{}
	for _, c := range t.chains {
		nc := &nftables.Chain{Name: c.name, Table: table}
		if c.base != nil {
			accept := nftables.ChainPolicyAccept
			nc.Type, nc.Hooknum, nc.Priority, nc.Policy = c.base.typ, c.base.hook, c.base.prio, &accept
		}
		chains[c] = conn.AddChain(nc)
	}
	for _, m := range t.maps {
		// Named and host-ordered, as nft makes a map of names, so that nft
		// prints its keys.
		set := &nftables.Set{Table: table, Name: m.name, IsMap: true,
			KeyType: nftables.TypeIFName, DataType: nftables.TypeVerdict, KeyByteOrder: binaryutil.NativeEndian}
		elems := make([]nftables.SetElement, len(m.keys))
		for i, k := range m.keys {
			key := make([]byte, unix.IFNAMSIZ)
			copy(key, k)
			elems[i] = nftables.SetElement{Key: key, VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: m.chains[i]}}
		}
		if err := conn.AddSet(set, nil); err != nil {
			return fmt.Errorf("nftables map %s: %w", m.name, err)
		}
		// A netlink attribute holds at most 64 KiB: the elements go in
		// several messages.
		for chunk := range slices.Chunk(elems, 256) {
			if err := conn.SetAddElements(set, chunk); err != nil {
				return fmt.Errorf("nftables map %s: %w", m.name, err)
			}
		}
	}
	for _, c := range t.chains {
		for _, r := range c.rules {
			conn.AddRule(&nftables.Rule{Table: table, Chain: chains[c], Exprs: r.exprs})
		}
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("write nftables table %s: %w", TableName, err)
	}
	return nil
}

// Remove deletes the node's table, if it exists.
func (f *Firewall) Remove() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	conn, _, err := deleteTable(0)
	if err != nil {
		return err
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("delete nftables table %s: %w", TableName, err)
	}
	return nil
}

// deleteTable opens a batch that starts by deleting the node's table.
// Adding it first makes the delete valid whether or not the table exists.
// messages is how many more the batch will hold: the kernel takes the
// whole batch in one message and answers each part with an
// acknowledgement, so the socket's buffers must hold them all (the
// defaults fail past about a hundred VMs).
func deleteTable(messages int) (*nftables.Conn, *nftables.Table, error) {
	size := max(1<<20, messages*batchBytesPerMessage)
	conn, err := nftables.New(nftables.WithSockOptions(func(c *netlink.Conn) error {
		if err := c.SetWriteBuffer(size); err != nil {
			return fmt.Errorf("netlink write buffer: %w", err)
		}
		if err := c.SetReadBuffer(size); err != nil {
			return fmt.Errorf("netlink read buffer: %w", err)
		}
		return nil
	}))
	if err != nil {
		return nil, nil, fmt.Errorf("nftables: %w", err)
	}
	table := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	conn.AddTable(table)
	conn.DelTable(table)
	return conn, table, nil
}

// batchBytesPerMessage bounds the socket buffer one message of a batch
// needs: the largest rule the table holds, or the kernel's accounting of
// one acknowledgement.
const batchBytesPerMessage = 4096

func (vm VMRules) validate() error {
	var errs []error
	if len(vm.Tap) <= len(tapPrefix) || len(vm.Tap) >= unix.IFNAMSIZ || vm.Tap[:len(tapPrefix)] != tapPrefix {
		errs = append(errs, fmt.Errorf("tap %q is not %q followed by at most %d characters", vm.Tap, tapPrefix, unix.IFNAMSIZ-1-len(tapPrefix)))
	}
	if len(vm.MAC) != 6 || vm.MAC[0]&1 != 0 {
		errs = append(errs, fmt.Errorf("tap %s: guest MAC %q is not a unicast Ethernet address", vm.Tap, vm.MAC))
	}
	if !vm.Guest.Is4() {
		errs = append(errs, fmt.Errorf("guest address %s is not IPv4", vm.Guest))
	}
	if vm.Guest6.IsValid() && (!vm.Guest6.Is6() || vm.Guest6.Is4In6() || vm.Guest6.Zone() != "") {
		errs = append(errs, fmt.Errorf("guest IPv6 address %s is not a plain IPv6 address", vm.Guest6))
	}
	for _, fw := range vm.Forwards {
		if fw.Proto != "tcp" && fw.Proto != "udp" {
			errs = append(errs, fmt.Errorf("forward %+v: protocol must be tcp or udp", fw))
		}
		if fw.HostPort == 0 || fw.GuestPort == 0 {
			errs = append(errs, fmt.Errorf("forward %+v: ports must not be 0", fw))
		}
	}
	return errors.Join(errs...)
}

// validateAll checks each VM's rules, and that no two VMs share a tap or
// an address: the rules of one would admit the other's traffic.
func validateAll(vms []VMRules) error {
	var errs []error
	taps := map[string]bool{}
	addrs := map[netip.Addr]bool{}
	for _, vm := range vms {
		if err := vm.validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		if taps[vm.Tap] {
			errs = append(errs, fmt.Errorf("tap %s is given to two VMs", vm.Tap))
		}
		taps[vm.Tap] = true
		for _, a := range []netip.Addr{vm.Guest, vm.Guest6} {
			if a.IsValid() && addrs[a] {
				errs = append(errs, fmt.Errorf("address %s is given to two VMs", a))
			}
			addrs[a] = true
		}
	}
	return errors.Join(errs...)
}
