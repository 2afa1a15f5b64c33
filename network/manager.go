package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"

	"github.com/alephvm/alephvm/internal/release"
)

// Manager gives each VM its network: an allocation from the pool, its tap,
// its port forwards and its firewall rules, and takes them back. It keeps
// the desired state of every VM and rewrites the firewall from it.
type Manager struct {
	pool     *Pool
	fw       rulesWriter
	ports    PortRange
	log      *slog.Logger
	mu       sync.Mutex
	vms      map[string]*vmNet // by owner
	hostPort map[string]string // "tcp/24000" -> owner
	ipv6     IPv6Config
	deferred bool // DeferWrites: the firewall is written by Apply only
}

// rulesWriter replaces the firewall's rules with those of vms
// (Firewall.Apply).
type rulesWriter interface {
	Apply(vms []VMRules) error
}

type vmNet struct {
	alloc    Allocation
	v6       IPv6Net
	internet bool
	forwards []Forward
}

// VMKind is the kind of VM a network is for: the digit of its static
// IPv6 address, as the reference numbers them.
type VMKind int

// The kinds of VM.
const (
	KindProgram           VMKind = 1
	KindPersistentProgram VMKind = 2
	KindInstance          VMKind = 3
)

// IPv6Net is a VM's IPv6 network, from the node's pool: the host's end
// on the tap and the guest's address. The zero value is no IPv6.
type IPv6Net struct {
	Network     netip.Prefix
	Host, Guest netip.Addr
}

// HostPrefix is the host's IPv6 address with the network's length.
func (n IPv6Net) HostPrefix() netip.Prefix { return netip.PrefixFrom(n.Host, n.Network.Bits()) }

// GuestPrefix is the guest's IPv6 address with the network's length.
func (n IPv6Net) GuestPrefix() netip.Prefix { return netip.PrefixFrom(n.Guest, n.Network.Bits()) }

// IPv6Config gives VMs IPv6: each its static /124 of Pool (StaticIPv6).
// With NDPProxy the host answers neighbour solicitations on Uplink for
// the guests' addresses, for pools routed on the uplink's link rather
// than to the host.
type IPv6Config struct {
	Pool     netip.Prefix
	NDPProxy bool
	Uplink   string
}

// AttachRequest asks for a VM's network.
type AttachRequest struct {
	Owner    string // the VM's item hash
	Kind     VMKind
	Index    int // the allocation found again after a restart, or -1 for a fresh one
	Internet bool
	Ports    []PortRequest
}

// PortRange is where host ports of forwards are taken from.
type PortRange struct{ First, Last uint16 }

// DefaultPorts stay below Linux's ephemeral ports (32768-60999), so a
// forward never takes a port an outgoing connection of the host could use.
var DefaultPorts = PortRange{First: 24000, Last: 32767}

// NewManager returns a manager of pool's networks behind fw.
// SetIPv6 gives the VMs attached from now on IPv6 (see IPv6Config); the
// host must forward IPv6 (EnableIPv6Forwarding).
func (m *Manager) SetIPv6(c IPv6Config) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ipv6 = c
}

func NewManager(pool *Pool, fw *Firewall, ports PortRange, log *slog.Logger) *Manager {
	return &Manager{pool: pool, fw: fw, ports: ports, log: log, vms: map[string]*vmNet{}, hostPort: map[string]string{}}
}

// Attachment is a VM's network as the manager made it.
type Attachment struct {
	Allocation
	IPv6     IPv6Net // zero without an IPv6 pool
	Forwards []Forward
}

// PortRequest asks for a VM port to be forwarded from the host. HostPort 0
// lets the manager choose one.
type PortRequest struct {
	Proto     string
	GuestPort uint16
	HostPort  uint16
}

// Attach gives owner a network: a fresh allocation and tap (index < 0), or
// the allocation at index found again after a restart, whose tap is kept
// as it is when it exists. Forwards keep the host ports asked for and get
// free ones otherwise.
func (m *Manager) Attach(req AttachRequest) (Attachment, error) {
	owner, index, internet, ports := req.Owner, req.Index, req.Internet, req.Ports
	m.mu.Lock()
	defer m.mu.Unlock()
	if v, ok := m.vms[owner]; ok {
		return Attachment{Allocation: v.alloc, IPv6: v.v6, Forwards: v.forwards}, nil
	}
	var v6 IPv6Net
	if m.ipv6.Pool.IsValid() {
		var err error
		if v6.Network, v6.Host, v6.Guest, err = StaticIPv6(m.ipv6.Pool, int(req.Kind), owner); err != nil {
			return Attachment{}, err
		}
	}
	var alloc Allocation
	var err error
	if index < 0 {
		alloc, err = m.pool.Allocate(owner)
	} else {
		alloc, err = m.pool.Reserve(index, owner)
	}
	if err != nil {
		return Attachment{}, err
	}
	// Each step's undo is added once it is done; a later failure runs
	// them in reverse.
	var made release.List
	made.AddFunc("address", func() { m.pool.Release(alloc.Index) })
	fail := func(err error) (Attachment, error) {
		_ = made.Release(context.Background())
		return Attachment{}, err
	}
	v := &vmNet{alloc: alloc, v6: v6, internet: internet}
	// Ports taken before a failure are given back too.
	made.AddFunc("ports", func() { m.releasePortsLocked(owner) })
	if v.forwards, err = m.takePortsLocked(owner, ports); err != nil {
		return fail(err)
	}
	if index < 0 || !tapExists(alloc.Tap) {
		if err := CreateTap(alloc.Tap, alloc.HostPrefix()); err != nil {
			return fail(err)
		}
		made.Add("tap", func(context.Context) error { return DeleteTap(alloc.Tap) })
	} else if err := hardenTap(alloc.Tap); err != nil { // a tap made by an older node
		return fail(err)
	}
	if v6.Guest.IsValid() {
		if err := addTapAddress(alloc.Tap, v6.HostPrefix()); err != nil {
			return fail(err)
		}
		if m.ipv6.NDPProxy {
			if err := proxyNDP(m.ipv6.Uplink, v6.Guest, true); err != nil {
				return fail(err)
			}
			made.AddFunc("ndp proxy", func() { _ = proxyNDP(m.ipv6.Uplink, v6.Guest, false) })
		}
	}
	if err := pinNeighbours(alloc.Tap, alloc.MAC(), alloc.Guest, v6.Guest); err != nil {
		return fail(err)
	}
	m.vms[owner] = v
	made.AddFunc("rules", func() { delete(m.vms, owner) })
	if err := m.applyLocked(); err != nil {
		return fail(err)
	}
	return Attachment{Allocation: alloc, IPv6: v6, Forwards: v.forwards}, nil
}

// Detach removes owner's rules, tap and allocation.
func (m *Manager) Detach(owner string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vms[owner]
	if !ok {
		return nil
	}
	delete(m.vms, owner)
	var errs []error
	if err := m.applyLocked(); err != nil {
		errs = append(errs, err)
	}
	if err := DeleteTap(v.alloc.Tap); err != nil {
		errs = append(errs, err)
	}
	if m.ipv6.NDPProxy && v.v6.Guest.IsValid() {
		if err := proxyNDP(m.ipv6.Uplink, v.v6.Guest, false); err != nil {
			errs = append(errs, err)
		}
	}
	m.releasePortsLocked(owner)
	m.pool.Release(v.alloc.Index)
	return errors.Join(errs...)
}

// SetForwards replaces owner's port forwards with ports, as when its
// owner changes them: a forward asked again keeps its host port, the
// others get free ones. On failure the forwards stay as they were.
func (m *Manager) SetForwards(owner string, ports []PortRequest) ([]Forward, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vms[owner]
	if !ok {
		return nil, fmt.Errorf("set port forwards: %s has no network", owner)
	}
	old := v.forwards
	held := map[string]uint16{}
	for _, f := range old {
		held[portKey(f.Proto, f.GuestPort)] = f.HostPort
	}
	asked := make([]PortRequest, len(ports))
	for i, p := range ports {
		if p.HostPort == 0 {
			p.HostPort = held[portKey(p.Proto, p.GuestPort)]
		}
		asked[i] = p
	}
	restore := func() {
		m.releasePortsLocked(owner)
		for _, f := range old {
			m.hostPort[portKey(f.Proto, f.HostPort)] = owner
		}
		v.forwards = old
	}
	m.releasePortsLocked(owner)
	fws, err := m.takePortsLocked(owner, asked)
	if err != nil {
		restore()
		return nil, err
	}
	v.forwards = fws
	if err := m.applyLocked(); err != nil {
		restore()
		return nil, errors.Join(err, m.applyLocked())
	}
	return slices.Clone(fws), nil
}

// Forwards returns owner's port forwards.
func (m *Manager) Forwards(owner string) []Forward {
	m.mu.Lock()
	defer m.mu.Unlock()
	if v, ok := m.vms[owner]; ok {
		return slices.Clone(v.forwards)
	}
	return nil
}

// RemoveOrphanTaps deletes the VM taps that belong to no attached VM, as
// left by VMs that ended while the node was down.
func (m *Manager) RemoveOrphanTaps() error {
	taps, err := Taps()
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	live := map[string]bool{}
	for _, v := range m.vms {
		live[v.alloc.Tap] = true
	}
	var errs []error
	for _, tap := range taps {
		if !live[tap] {
			m.log.Info("removing orphan tap", "tap", tap)
			errs = append(errs, DeleteTap(tap))
		}
	}
	return errors.Join(errs...)
}

// DeferWrites makes Attach, Detach and SetForwards keep the desired state
// without writing the firewall, until Apply writes it whole. A node
// starting calls it before it takes back the VMs an earlier node left
// running: the table that node left, which holds all of them, is then
// replaced once, by a table that holds all of them too. Written after each
// attach, the first table would hold only the first VM taken back, and the
// others would lose their forwards (new connections refused) and their
// traffic (dropped by the guard) until their own turn came.
// The rules are still checked at each change, so that a VM whose rules
// cannot be written fails to attach, as it would otherwise.
func (m *Manager) DeferWrites() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.deferred = true
}

// Apply rewrites the firewall from the attached VMs, as at node start,
// and ends DeferWrites.
func (m *Manager) Apply() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.deferred = false
	return m.applyLocked()
}

func (m *Manager) applyLocked() error {
	rules := make([]VMRules, 0, len(m.vms))
	for _, v := range m.vms {
		rules = append(rules, VMRules{Tap: v.alloc.Tap, MAC: v.alloc.MAC(), Guest: v.alloc.Guest, Guest6: v.v6.Guest, Internet: v.internet, Forwards: v.forwards})
	}
	slices.SortFunc(rules, func(a, b VMRules) int { return a.Guest.Compare(b.Guest) })
	if m.deferred {
		return validateAll(rules)
	}
	return m.fw.Apply(rules)
}

func portKey(proto string, port uint16) string { return proto + "/" + strconv.Itoa(int(port)) }

// takePortsLocked reserves the host ports of forwards. A port asked twice
// is forwarded once, and a guest port forwarded for both tcp and udp gets
// one host port for both where it is free, as the executions list shows
// one host port per guest port.
func (m *Manager) takePortsLocked(owner string, ports []PortRequest) ([]Forward, error) {
	var fws []Forward
	seen := map[string]bool{}
	byGuest := map[uint16]uint16{}
	for _, p := range ports {
		if seen[portKey(p.Proto, p.GuestPort)] {
			continue
		}
		if host, ok := byGuest[p.GuestPort]; ok && p.HostPort == 0 {
			if _, taken := m.hostPort[portKey(p.Proto, host)]; !taken && portFree(p.Proto, host) {
				p.HostPort = host
			}
		}
		fw, err := m.takePortLocked(owner, p)
		if err != nil {
			return nil, err
		}
		seen[portKey(p.Proto, p.GuestPort)] = true
		byGuest[p.GuestPort] = fw.HostPort
		fws = append(fws, fw)
	}
	return fws, nil
}

// takePortLocked reserves the host port of one forward.
func (m *Manager) takePortLocked(owner string, p PortRequest) (Forward, error) {
	if p.Proto != "tcp" && p.Proto != "udp" {
		return Forward{}, fmt.Errorf("port forward: protocol must be tcp or udp, got %q", p.Proto)
	}
	if p.HostPort != 0 {
		key := portKey(p.Proto, p.HostPort)
		if held, ok := m.hostPort[key]; ok && held != owner {
			return Forward{}, fmt.Errorf("host port %s is forwarded to %s already", key, held)
		}
		m.hostPort[key] = owner
		return Forward{Proto: p.Proto, HostPort: p.HostPort, GuestPort: p.GuestPort}, nil
	}
	for port := m.ports.First; port <= m.ports.Last && port != 0; port++ {
		key := portKey(p.Proto, port)
		if _, taken := m.hostPort[key]; taken || !portFree(p.Proto, port) {
			continue
		}
		m.hostPort[key] = owner
		return Forward{Proto: p.Proto, HostPort: port, GuestPort: p.GuestPort}, nil
	}
	return Forward{}, fmt.Errorf("no free host port for %s/%d between %d and %d", p.Proto, p.GuestPort, m.ports.First, m.ports.Last)
}

func (m *Manager) releasePortsLocked(owner string) {
	for k, o := range m.hostPort {
		if o == owner {
			delete(m.hostPort, k)
		}
	}
}

// portFree reports whether no service of the host listens on port: a
// forward there would hide it from outside clients.
func portFree(proto string, port uint16) bool {
	addr := netip.AddrPortFrom(netip.IPv4Unspecified(), port).String()
	if proto == "udp" {
		c, err := net.ListenPacket("udp4", addr)
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	l, err := net.Listen("tcp4", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func tapExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}
