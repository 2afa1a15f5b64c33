package network

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The node's table is built by a pure function (buildTable) into a model
// that holds, for each rule, both the expressions the kernel gets and the
// line `nft list table` prints for them. The golden test compares the
// printed form with testdata; the root test writes the expressions and
// compares what nft prints back with the same file, so the two cannot
// drift apart.

// nftTable is the node's table: its maps and its chains in the order they
// are made (and printed).
type nftTable struct {
	maps   []*nftMap
	chains []*nftChain
}

// nftMap is a named map from interface names to the chains their packets
// jump to. Its keys are in the order nft prints them: their bytes read as
// a little-endian number.
type nftMap struct {
	name   string
	keys   []string
	chains []string
}

// nftChain is a chain; base is nil for a regular chain (one jumped to).
type nftChain struct {
	name  string
	base  *baseChain
	rules []nftRule
}

type baseChain struct {
	typ  nftables.ChainType
	hook *nftables.ChainHook
	prio *nftables.ChainPriority
	text string // how nft prints its type, hook and priority
}

type nftRule struct {
	text  string
	exprs []expr.Any
}

// match is one part of a rule. family is the protocol whose header the
// match reads (unix.NFPROTO_IPV4 or _IPV6), 0 for none: a rule checks
// "meta nfproto" once before its first match of a family, as nft does,
// and nft hides that check when it prints the match.
type match struct {
	text   string
	family byte
	exprs  []expr.Any
}

func (c *nftChain) add(ms ...match) {
	var r nftRule
	var texts []string
	var family byte
	for _, m := range ms {
		if m.family != 0 && m.family != family {
			r.exprs = append(r.exprs,
				&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{m.family}})
			family = m.family
		}
		r.exprs = append(r.exprs, m.exprs...)
		if m.text != "" {
			texts = append(texts, m.text)
		}
	}
	r.text = strings.Join(texts, " ")
	c.rules = append(c.rules, r)
}

// String prints the table as `nft list table inet alephvm` does.
func (t nftTable) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	for i, m := range t.maps {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\tmap %s {\n\t\ttype ifname : verdict\n", m.name)
		for j, k := range m.keys {
			sep := ",\n"
			if j == len(m.keys)-1 {
				sep = " }\n"
			}
			lead := "\t\t\t     "
			if j == 0 {
				lead = "\t\telements = { "
			}
			fmt.Fprintf(&b, "%s%q : jump %s%s", lead, k, m.chains[j], sep)
		}
		b.WriteString("\t}\n")
	}
	for i, c := range t.chains {
		if i > 0 || len(t.maps) > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\tchain %s {\n", c.name)
		if c.base != nil {
			fmt.Fprintf(&b, "\t\t%s; policy accept;\n", c.base.text)
		}
		for _, r := range c.rules {
			fmt.Fprintf(&b, "\t\t%s\n", r.text)
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// tableSpec is everything the table is made from.
type tableSpec struct {
	uplink  string       // "" when VMs have no way out
	pool    netip.Prefix // the VMs' IPv4 addresses, masqueraded on the uplink
	blocked []netip.Prefix
	allowed []netip.Prefix
	dns     []netip.Addr
	vms     []VMRules
}

// egressChain is jumped to by the traffic of every VM with internet that
// leaves by the uplink: it keeps the VMs away from the operator's networks.
const egressChain = "egress"

// guardChain names the chain that admits what comes in from a VM's tap.
func guardChain(tap string) string { return "from_" + tap }

// publishedChain names the chain that admits connections to a VM's
// published ports.
func publishedChain(tap string) string { return "to_" + tap }

// buildTable makes the node's table (see Firewall.Apply for what it does).
func buildTable(s tableSpec) nftTable {
	accept, drop := verdict(expr.VerdictAccept), verdict(expr.VerdictDrop)
	base := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority, text string) *nftChain {
		return &nftChain{name: name, base: &baseChain{typ: typ, hook: hook, prio: prio, text: text}}
	}
	pre := base("prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest, "type nat hook prerouting priority dstnat")
	out := base("output", nftables.ChainTypeNAT, nftables.ChainHookOutput, nftables.ChainPriorityNATDest, "type nat hook output priority -100")
	post := base("postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource, "type nat hook postrouting priority srcnat")
	guard := base("guard", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityRaw, "type filter hook prerouting priority raw")
	fwd := base("forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter, "type filter hook forward priority filter")
	in := base("input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter, "type filter hook input priority filter")
	t := nftTable{chains: []*nftChain{pre, out, post, guard, fwd, in}}

	for _, vm := range s.vms {
		for _, fw := range vm.Forwards {
			pre.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpNeq, tapPrefix), nfproto(unix.NFPROTO_IPV4), port(fw.Proto, fw.HostPort), dnat(vm.Guest, fw.GuestPort))
			out.add(nfproto(unix.NFPROTO_IPV4), localDestination(), port(fw.Proto, fw.HostPort), dnat(vm.Guest, fw.GuestPort))
		}
	}
	if s.uplink != "" {
		post.add(addrMatch(source, expr.CmpOpEq, s.pool), ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, s.uplink), masquerade())
	}

	// Per packet, one lookup in a map of the taps, however many VMs there
	// are; then a few rules of the VM's own.
	var taps, internet, published []string
	for _, vm := range s.vms {
		taps = append(taps, vm.Tap)
		if vm.Internet {
			internet = append(internet, vm.Tap)
		}
		if len(vm.Forwards) > 0 {
			published = append(published, vm.Tap)
		}
	}
	fromTaps := tapMap("taps", taps, guardChain)
	t.maps = append(t.maps, fromTaps)
	var toInternet *nftMap
	if s.uplink != "" {
		toInternet = tapMap("internet", internet, func(string) string { return egressChain })
		t.maps = append(t.maps, toInternet)
	}
	toTaps := tapMap("published", published, publishedChain)
	t.maps = append(t.maps, toTaps)

	// What comes in from a tap is the VM's own traffic or is dropped, before
	// conntrack sees it: a forged packet can neither leave nor join another
	// VM's connection.
	guard.add(ifnameVmap(expr.MetaKeyIIFNAME, fromTaps))
	guard.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), drop)
	anyIPv6 := false
	for _, vm := range s.vms {
		from := &nftChain{name: guardChain(vm.Tap)}
		t.chains = append(t.chains, from)
		from.add(etherSource(expr.CmpOpNeq, vm.MAC), drop)
		from.add(addrMatch(source, expr.CmpOpEq, netip.PrefixFrom(vm.Guest, 32)), accept)
		if vm.Guest6.IsValid() {
			anyIPv6 = true
			from.add(addrMatch(source, expr.CmpOpEq, netip.PrefixFrom(vm.Guest6, 128)), accept)
			// Neighbour discovery, which runs on link-local addresses (and
			// from :: while the guest checks its address is free).
			linkLocal := addrMatch(source, expr.CmpOpEq, netip.MustParsePrefix("fe80::/10"))
			from.add(linkLocal, hopLimit255(), icmpv6Type(ndNeighborSolicit), accept)
			from.add(linkLocal, hopLimit255(), icmpv6Type(ndNeighborAdvert), accept)
			from.add(addrMatch(source, expr.CmpOpEq, netip.PrefixFrom(netip.IPv6Unspecified(), 128)), hopLimit255(), icmpv6Type(ndNeighborSolicit), accept)
		}
		from.add(drop)

		if len(vm.Forwards) == 0 {
			continue
		}
		to := &nftChain{name: publishedChain(vm.Tap)}
		t.chains = append(t.chains, to)
		for _, fw := range vm.Forwards {
			to.add(ctDNAT(), port(fw.Proto, fw.GuestPort), accept)
		}
		// IPv6 is routed, not translated: the published ports are open on
		// the guest's own address, from outside only.
		if vm.Guest6.IsValid() && s.uplink != "" {
			for _, fw := range vm.Forwards {
				to.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, s.uplink),
					addrMatch(destination, expr.CmpOpEq, netip.PrefixFrom(vm.Guest6, 128)), port(fw.Proto, fw.GuestPort), accept)
			}
		}
	}

	fwd.add(ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), accept)
	if toInternet != nil {
		fwd.add(ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, s.uplink), ifnameVmap(expr.MetaKeyIIFNAME, toInternet))
	}
	fwd.add(ifnameVmap(expr.MetaKeyOIFNAME, toTaps))
	fwd.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), drop)
	fwd.add(ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, tapPrefix), drop)

	if toInternet != nil {
		egress := &nftChain{name: egressChain}
		t.chains = append(t.chains, egress)
		for _, r := range s.dns {
			dst := addrMatch(destination, expr.CmpOpEq, netip.PrefixFrom(r, r.BitLen()))
			egress.add(dst, port("udp", 53), accept)
			egress.add(dst, port("tcp", 53), accept)
		}
		for _, p := range s.allowed {
			egress.add(addrMatch(destination, expr.CmpOpEq, p), accept)
		}
		// Refused rather than dropped: a guest's probe of a forbidden
		// network (a cloud-init looking for a metadata service) fails at
		// once instead of waiting for its timeout.
		for _, p := range s.blocked {
			egress.add(addrMatch(destination, expr.CmpOpEq, p), rejectProhibited())
		}
		egress.add(accept)
	}

	in.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), accept)
	if anyIPv6 {
		in.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), icmpv6Type(ndNeighborSolicit), accept)
		in.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), icmpv6Type(ndNeighborAdvert), accept)
	}
	in.add(ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, tapPrefix), drop)
	return t
}

// ifname matches an interface name; a name equal to tapPrefix matches every
// name that starts with it, as nft's "avm*" does.
func ifname(key expr.MetaKey, op expr.CmpOp, name string) match {
	data := []byte(name)
	text := fmt.Sprintf("%q", name)
	if name == tapPrefix {
		text = fmt.Sprintf("%q", name+"*")
	} else {
		data = make([]byte, unix.IFNAMSIZ)
		copy(data, name)
	}
	if op == expr.CmpOpNeq {
		text = "!= " + text
	}
	kw := "iifname"
	if key == expr.MetaKeyOIFNAME {
		kw = "oifname"
	}
	return match{text: kw + " " + text, exprs: []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}}
}

// tapMap maps each of taps to the chain its packets jump to.
func tapMap(name string, taps []string, chain func(tap string) string) *nftMap {
	key := func(name string) []byte {
		b := make([]byte, unix.IFNAMSIZ)
		copy(b, name)
		return b
	}
	taps = slices.Clone(taps)
	slices.SortFunc(taps, func(a, b string) int {
		ka, kb := key(a), key(b)
		for i := len(ka) - 1; i >= 0; i-- {
			if ka[i] != kb[i] {
				return int(ka[i]) - int(kb[i])
			}
		}
		return 0
	})
	m := &nftMap{name: name, keys: taps}
	for _, tap := range taps {
		m.chains = append(m.chains, chain(tap))
	}
	return m
}

// ifnameVmap gives the verdict the map holds for the packet's input or
// output interface.
func ifnameVmap(key expr.MetaKey, m *nftMap) match {
	kw := "iifname"
	if key == expr.MetaKeyOIFNAME {
		kw = "oifname"
	}
	return match{text: kw + " vmap @" + m.name, exprs: []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: m.name, IsDestRegSet: true},
	}}
}

// nfproto matches the packet's family, printed: only where no match of an
// address of that family follows.
func nfproto(family byte) match {
	name := "ipv4"
	if family == unix.NFPROTO_IPV6 {
		name = "ipv6"
	}
	return match{text: "meta nfproto " + name, family: family}
}

type direction bool

const (
	source      direction = false
	destination direction = true
)

// addrMatch matches the source or destination address against a prefix
// (an address when it is full length), reading only the prefix's bytes
// where it ends on a byte boundary, as nft does.
func addrMatch(dir direction, op expr.CmpOp, p netip.Prefix) match {
	p = p.Masked()
	family, kw, offset := byte(unix.NFPROTO_IPV4), "ip", uint32(12)
	if p.Addr().Is6() {
		family, kw, offset = unix.NFPROTO_IPV6, "ip6", 8
	}
	size := uint32(p.Addr().BitLen() / 8)
	if dir == destination {
		offset += size
	}
	text := p.String()
	if p.IsSingleIP() {
		text = p.Addr().String()
	}
	if op == expr.CmpOpNeq {
		text = "!= " + text
	}
	field := "saddr"
	if dir == destination {
		field = "daddr"
	}
	text = kw + " " + field + " " + text
	addr := p.Addr().AsSlice()
	var exprs []expr.Any
	if p.Bits()%8 == 0 {
		n := uint32(p.Bits() / 8)
		exprs = []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: n},
			&expr.Cmp{Op: op, Register: 1, Data: addr[:n]},
		}
	} else {
		mask := net.CIDRMask(p.Bits(), p.Addr().BitLen())
		exprs = []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: size},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: size, Mask: mask, Xor: make([]byte, size)},
			&expr.Cmp{Op: op, Register: 1, Data: addr},
		}
	}
	return match{text: text, family: family, exprs: exprs}
}

// etherSource matches the frame's source MAC address.
func etherSource(op expr.CmpOp, mac net.HardwareAddr) match {
	text := "ether saddr " + mac.String()
	if op == expr.CmpOpNeq {
		text = "ether saddr != " + mac.String()
	}
	return match{text: text, exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFTYPE, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint16(unix.ARPHRD_ETHER)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 6, Len: 6},
		&expr.Cmp{Op: op, Register: 1, Data: []byte(mac)},
	}}
}

// The neighbour discovery messages a guest needs to send.
const (
	ndNeighborSolicit = 135
	ndNeighborAdvert  = 136
)

func icmpv6Type(typ byte) match {
	name := map[byte]string{ndNeighborSolicit: "nd-neighbor-solicit", ndNeighborAdvert: "nd-neighbor-advert"}[typ]
	return match{text: "icmpv6 type " + name, family: unix.NFPROTO_IPV6, exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{typ}},
	}}
}

// hopLimit255 matches packets that crossed no router: neighbour discovery
// messages carry 255 (RFC 4861), so none can come from beyond the link.
func hopLimit255() match {
	return match{text: "ip6 hoplimit 255", family: unix.NFPROTO_IPV6, exprs: []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 7, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{255}},
	}}
}

// port matches a TCP or UDP destination port.
func port(proto string, p uint16) match {
	l4 := byte(unix.IPPROTO_TCP)
	if proto == "udp" {
		l4 = unix.IPPROTO_UDP
	}
	return match{text: fmt.Sprintf("%s dport %d", proto, p), exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{l4}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(p)},
	}}
}

func dnat(to netip.Addr, p uint16) match {
	addr := to.As4()
	return match{text: fmt.Sprintf("dnat ip to %s", netip.AddrPortFrom(to, p)), exprs: []expr.Any{
		&expr.Immediate{Register: 1, Data: addr[:]},
		&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(p)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
	}}
}

func masquerade() match { return match{text: "masquerade", exprs: []expr.Any{&expr.Masq{}}} }

// localDestination matches packets to one of the host's own addresses.
func localDestination() match {
	const rtnLocal = 2
	return match{text: "fib daddr type local", exprs: []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(rtnLocal)},
	}}
}

func ctState(bits uint32) match {
	return match{text: "ct state established,related", exprs: []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}}
}

// ctDNAT matches connections whose destination was rewritten by a port
// forward.
func ctDNAT() match {
	const ipsDstNAT = 1 << 5
	return match{text: "ct status dnat", exprs: []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}}
}

func verdict(k expr.VerdictKind) match {
	return match{text: map[expr.VerdictKind]string{expr.VerdictAccept: "accept", expr.VerdictDrop: "drop"}[k],
		exprs: []expr.Any{&expr.Verdict{Kind: k}}}
}

// rejectProhibited answers with an ICMP (or ICMPv6) "administratively
// prohibited" error.
func rejectProhibited() match {
	return match{text: "reject with icmpx admin-prohibited", exprs: []expr.Any{
		&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED},
	}}
}

func jump(chain string) match {
	return match{text: "jump " + chain, exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: chain}}}
}
