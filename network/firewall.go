package network

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
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
	Guest    netip.Addr
	Internet bool // the VM may open connections to the outside world
	Forwards []Forward
}

// Forward maps a port of the host to a port of a VM.
type Forward struct {
	Proto     string `json:"proto"` // "tcp" or "udp"
	HostPort  uint16 `json:"host_port"`
	GuestPort uint16 `json:"guest_port"`
}

// Firewall writes the node's nftables table.
type Firewall struct {
	uplink string       // the interface towards the outside world
	pool   netip.Prefix // every VM address is in it
	mu     sync.Mutex
}

// NewFirewall returns a firewall for VMs in pool reaching the outside
// world through uplink.
func NewFirewall(uplink string, pool netip.Prefix) *Firewall {
	return &Firewall{uplink: uplink, pool: pool.Masked()}
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
//   - forward (filter): established traffic, each VM's egress to the uplink
//     when it has internet, and forwarded ports into each VM; every other
//     packet from or to a VM is dropped, so VMs cannot reach each other;
//   - input (filter): a VM may answer the host but not open connections to
//     any of the host's own services.
//
// The base chains' policy is accept: traffic that is not a VM's is left to
// the host's own rules.
func (f *Firewall) Apply(vms []VMRules) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, vm := range vms {
		if err := vm.validate(); err != nil {
			return err
		}
	}
	conn, table, err := deleteTable()
	if err != nil {
		return err
	}
	conn.AddTable(table)
	accept := nftables.ChainPolicyAccept
	chain := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		return conn.AddChain(&nftables.Chain{Name: name, Table: table, Type: typ, Hooknum: hook, Priority: prio, Policy: &accept})
	}
	pre := chain("prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
	out := chain("output", nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest)
	post := chain("postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	fwd := chain("forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	in := chain("input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter)
	rule := func(c *nftables.Chain, exprs ...[]expr.Any) {
		conn.AddRule(&nftables.Rule{Table: table, Chain: c, Exprs: slices.Concat(exprs...)})
	}

	for _, vm := range vms {
		for _, fw := range vm.Forwards {
			rule(pre, ifname(expr.MetaKeyIIFNAME, expr.CmpOpNeq, tapPrefix), ipv4(), l4(fw.Proto), dport(fw.HostPort), dnat(vm.Guest, fw.GuestPort))
			rule(out, ipv4(), localDestination(), l4(fw.Proto), dport(fw.HostPort), dnat(vm.Guest, fw.GuestPort))
		}
	}
	if f.uplink != "" {
		rule(post, ipv4(), saddrIn(f.pool), ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, f.uplink), masquerade())
	}

	rule(fwd, ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), verdict(expr.VerdictAccept))
	for _, vm := range vms {
		if vm.Internet && f.uplink != "" {
			rule(fwd, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, vm.Tap), ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, f.uplink), verdict(expr.VerdictAccept))
		}
		for _, fw := range vm.Forwards {
			rule(fwd, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, vm.Tap), ctDNAT(), l4(fw.Proto), dport(fw.GuestPort), verdict(expr.VerdictAccept))
		}
	}
	rule(fwd, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), verdict(expr.VerdictDrop))
	rule(fwd, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, tapPrefix), verdict(expr.VerdictDrop))

	rule(in, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), verdict(expr.VerdictAccept))
	rule(in, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), verdict(expr.VerdictDrop))

	if err := conn.Flush(); err != nil {
		return fmt.Errorf("write nftables table %s: %w", TableName, err)
	}
	return nil
}

// Remove deletes the node's table, if it exists.
func (f *Firewall) Remove() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	conn, _, err := deleteTable()
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
func deleteTable() (*nftables.Conn, *nftables.Table, error) {
	conn, err := nftables.New()
	if err != nil {
		return nil, nil, fmt.Errorf("nftables: %w", err)
	}
	table := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	conn.AddTable(table)
	conn.DelTable(table)
	return conn, table, nil
}

func (vm VMRules) validate() error {
	var errs []error
	if len(vm.Tap) <= len(tapPrefix) || vm.Tap[:len(tapPrefix)] != tapPrefix {
		errs = append(errs, fmt.Errorf("tap %q does not start with %q", vm.Tap, tapPrefix))
	}
	if !vm.Guest.Is4() {
		errs = append(errs, fmt.Errorf("guest address %s is not IPv4", vm.Guest))
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

// ifname matches an interface name; a name equal to tapPrefix matches every
// name that starts with it, as nft's "avm*" does.
func ifname(key expr.MetaKey, op expr.CmpOp, name string) []expr.Any {
	data := []byte(name)
	if name != tapPrefix {
		data = make([]byte, unix.IFNAMSIZ)
		copy(data, name)
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}
}

func ipv4() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
}

func saddrIn(p netip.Prefix) []expr.Any {
	addr := p.Addr().As4()
	mask := netip.PrefixFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), p.Bits()).Masked().Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask[:], Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr[:]},
	}
}

func l4(proto string) []expr.Any {
	p := byte(unix.IPPROTO_TCP)
	if proto == "udp" {
		p = unix.IPPROTO_UDP
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func dport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

func dnat(to netip.Addr, port uint16) []expr.Any {
	addr := to.As4()
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: addr[:]},
		&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
	}
}

func masquerade() []expr.Any { return []expr.Any{&expr.Masq{}} }

// localDestination matches packets to one of the host's own addresses.
func localDestination() []expr.Any {
	const rtnLocal = 2
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(rtnLocal)},
	}
}

func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// ctDNAT matches connections whose destination was rewritten by a port
// forward.
func ctDNAT() []expr.Any {
	const ipsDstNAT = 1 << 5
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }
