package execution

import (
	"errors"
	"fmt"
	"sync"
)

// Capacity is an amount of memory and vCPUs. In a node's capacity, a zero
// field is not limited.
type Capacity struct {
	MemoryMiB int
	VCPUs     int
}

// ErrInsufficientCapacity is returned for a VM the node cannot hold now.
var ErrInsufficientCapacity = errors.New("insufficient capacity")

// Admission accounts what the node's VMs hold, programs and instances
// alike, against one capacity: a VM is admitted before anything is made
// for it, and holds its share until it is gone.
type Admission struct {
	mu       sync.Mutex
	capacity Capacity
	used     Capacity
}

// NewAdmission returns the accounting of capacity c.
func NewAdmission(c Capacity) *Admission { return &Admission{capacity: c} }

// Admit reserves need for what (a VM, named in the error), or refuses it
// with ErrInsufficientCapacity. release frees the reservation; it may be
// called more than once.
func (a *Admission) Admit(what string, need Capacity) (release func(), err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	mem, cpus := a.used.MemoryMiB+need.MemoryMiB, a.used.VCPUs+need.VCPUs
	c := a.capacity
	if (c.MemoryMiB > 0 && mem > c.MemoryMiB) || (c.VCPUs > 0 && cpus > c.VCPUs) {
		return nil, fmt.Errorf("%w: %s needs %d MiB and %d vCPUs; the node has %d MiB and %d vCPUs for VMs, %d MiB and %d in use",
			ErrInsufficientCapacity, what, need.MemoryMiB, need.VCPUs, c.MemoryMiB, c.VCPUs, a.used.MemoryMiB, a.used.VCPUs)
	}
	return a.holdLocked(need), nil
}

// Hold reserves need whatever the capacity: for a VM that runs already,
// found by a restarted node.
func (a *Admission) Hold(need Capacity) (release func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.holdLocked(need)
}

func (a *Admission) holdLocked(need Capacity) func() {
	a.used.MemoryMiB += need.MemoryMiB
	a.used.VCPUs += need.VCPUs
	var once sync.Once
	return func() {
		once.Do(func() {
			a.mu.Lock()
			defer a.mu.Unlock()
			a.used.MemoryMiB -= need.MemoryMiB
			a.used.VCPUs -= need.VCPUs
		})
	}
}

// Used returns what the node's VMs hold.
func (a *Admission) Used() Capacity {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.used
}

// Capacity returns what the node may give to VMs.
func (a *Admission) Capacity() Capacity { return a.capacity }
