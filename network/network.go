// Package network owns the VMs' host-side networking: the address plan
// (one small IPv4 network per VM out of a pool, the host at .1 and the
// guest at .2) and the tap device each VM's NIC is attached to.
package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
)

// Allocation is the network of one VM.
type Allocation struct {
	Index   int          // position of the VM's network in the pool
	Network netip.Prefix // the VM's own network, e.g. 172.16.4.0/24
	Host    netip.Addr   // the host's end, on the tap: .1
	Guest   netip.Addr   // the guest's address: .2
	Tap     string       // the tap device's name
}

// HostPrefix is the host's address with the network's prefix length, as it
// is set on the tap.
func (a Allocation) HostPrefix() netip.Prefix { return netip.PrefixFrom(a.Host, a.Network.Bits()) }

// GuestPrefix is the guest's address with the network's prefix length.
func (a Allocation) GuestPrefix() netip.Prefix { return netip.PrefixFrom(a.Guest, a.Network.Bits()) }

// MAC is the guest NIC's address: locally administered, derived from the
// guest's IPv4 address so that it is stable and unique on the node.
func (a Allocation) MAC() net.HardwareAddr {
	ip := a.Guest.As4()
	return net.HardwareAddr{0x06, 0x00, ip[0], ip[1], ip[2], ip[3]}
}

// TapName names the tap of the network at index; it stays well within
// Linux's 15-byte limit on interface names.
func TapName(index int) string { return "avm" + strconv.Itoa(index) }

// ErrPoolExhausted is returned when every network of the pool is in use.
var ErrPoolExhausted = errors.New("network: every VM network of the pool is in use")

// Pool hands out per-VM networks from an IPv4 range. An index is never
// handed out twice while it is in use.
type Pool struct {
	base     netip.Prefix
	vmBits   int
	count    int
	firstIdx int

	mu   sync.Mutex
	used map[int]string // index -> owner
}

// NewPool splits pool into networks of vmBits prefix length. The first
// firstIndex networks are skipped (the reference starts at 4).
func NewPool(pool netip.Prefix, vmBits, firstIndex int) (*Pool, error) {
	pool = pool.Masked()
	if !pool.Addr().Is4() {
		return nil, fmt.Errorf("network pool %s: only IPv4 pools are supported", pool)
	}
	if vmBits < pool.Bits() || vmBits > 30 {
		return nil, fmt.Errorf("network pool %s: VM prefix length %d must be between %d and 30", pool, vmBits, pool.Bits())
	}
	count := 1 << (vmBits - pool.Bits())
	if firstIndex < 0 || firstIndex >= count {
		return nil, fmt.Errorf("network pool %s: first index %d outside 0..%d", pool, firstIndex, count-1)
	}
	return &Pool{base: pool, vmBits: vmBits, count: count, firstIdx: firstIndex, used: map[int]string{}}, nil
}

// At returns the allocation of the network at index, whether in use or not.
func (p *Pool) At(index int) (Allocation, error) {
	if index < 0 || index >= p.count {
		return Allocation{}, fmt.Errorf("network index %d outside the pool's 0..%d", index, p.count-1)
	}
	base := p.base.Addr().As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(index) << (32 - p.vmBits)
	addr := func(off uint32) netip.Addr {
		v := n + off
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	return Allocation{
		Index:   index,
		Network: netip.PrefixFrom(addr(0), p.vmBits),
		Host:    addr(1),
		Guest:   addr(2),
		Tap:     TapName(index),
	}, nil
}

// Allocate reserves the lowest free network for owner.
func (p *Pool) Allocate(owner string) (Allocation, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := p.firstIdx; i < p.count; i++ {
		if _, taken := p.used[i]; !taken {
			p.used[i] = owner
			return p.At(i)
		}
	}
	return Allocation{}, ErrPoolExhausted
}

// Reserve marks index as used by owner, as when a node restarts and finds
// its running VMs again. Reserving an index another owner holds fails.
func (p *Pool) Reserve(index int, owner string) (Allocation, error) {
	a, err := p.At(index)
	if err != nil {
		return Allocation{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if held, ok := p.used[index]; ok && held != owner {
		return Allocation{}, fmt.Errorf("network %s is already used by %s", a.Network, held)
	}
	p.used[index] = owner
	return a, nil
}

// Release frees index.
func (p *Pool) Release(index int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.used, index)
}
