package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/metrics"
	"github.com/alephvm/alephvm/program"
)

// What the node's metrics and status page read of it: the VMs of the pool
// and of the instance manager, the admission's accounts, the volumes'
// filesystem and the store.

// metricsSource gives the node's metrics its VMs and capacity; n is set
// once the node is built, before anything scrapes.
type metricsSource struct{ n *node }

// programVM is what the program launcher's VMs tell the metrics.
type programVM interface {
	VM() execution.VM
	Hypervisor() string
}

// blockStatser is a VM whose monitor gives its disks' counters (QEMU's).
type blockStatser interface {
	BlockStats(ctx context.Context) (qemu.BlockStats, error)
}

func (s *metricsSource) VMs(ctx context.Context) ([]metrics.VM, error) {
	n := s.n
	var out []metrics.VM
	for _, e := range n.programs.List() {
		vm := metrics.VM{Ref: string(e.Ref), Type: execution.TypeProgram, Hypervisor: n.plan.Programs.Hypervisor, State: metrics.StateBooting,
			VCPUs: e.VCPUs, MemoryMiB: e.MemoryMiB, Tap: e.Networking.Tap}
		if e.Plan != nil && e.Plan.Message != nil {
			if c, ok := e.Plan.Message.Content.(*message.ProgramContent); ok {
				vm.Type = program.Type(c)
			}
		}
		if p, ok := e.Program.(programVM); ok && e.Running {
			vm.State, vm.StartedAt, vm.Hypervisor = metrics.StateRunning, e.Since, p.Hypervisor()
			withProcess(&vm, p.VM())
		}
		out = append(out, vm)
	}
	recs, err := n.instances.List(ctx)
	if err != nil {
		return out, err
	}
	for _, r := range recs {
		vm := metrics.VM{Ref: string(r.Ref), Type: execution.TypeInstance, Hypervisor: r.HypervisorName(), State: metrics.StateStopped,
			VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB}
		if v, ok := n.instances.VM(r.Ref); ok {
			vm.State, vm.StartedAt, vm.Tap = metrics.StateRunning, r.StartedAt, r.Tap
			withProcess(&vm, v)
		}
		out = append(out, vm)
	}
	return out, nil
}

// withProcess points the metrics at a running VM's process and, under
// QEMU, its monitor.
func withProcess(vm *metrics.VM, v execution.VM) {
	if v == nil {
		return
	}
	vm.Pid = v.Pid()
	if b, ok := v.(blockStatser); ok {
		vm.Disk = func(ctx context.Context) (metrics.DiskIO, error) {
			st, err := b.BlockStats(ctx)
			return metrics.DiskIO(st), err
		}
	}
}

func (s *metricsSource) Node(ctx context.Context) (metrics.Node, error) {
	n := s.n
	used, capacity := n.admission.Used(), n.admission.Capacity()
	out := metrics.Node{MemoryCapacityMiB: capacity.MemoryMiB, MemoryUsedMiB: used.MemoryMiB, VCPUsCapacity: capacity.VCPUs, VCPUsUsed: used.VCPUs}
	var st unix.Statfs_t
	if err := unix.Statfs(n.cfg.ExecutionRoot, &st); err != nil {
		return out, fmt.Errorf("statfs %s: %w", n.cfg.ExecutionRoot, err)
	}
	out.DiskCapacity, out.DiskFree = int64(st.Blocks)*st.Bsize, int64(st.Bavail)*st.Bsize
	size, err := n.store.Size(ctx)
	out.StoreSize = size
	return out, err
}

// statusSource gives the status page the node's identity, capacity and
// recent starts.
type statusSource struct {
	metrics *metricsSource
	started time.Time
}

func (s statusSource) NodeStatus(ctx context.Context) (api.NodeStatus, error) {
	host, _ := os.Hostname()
	st := api.NodeStatus{Hostname: host, StartedAt: s.started, RecentStarts: s.metrics.n.metrics.Recent()}
	node, err := s.metrics.Node(ctx)
	const mib = 1 << 20
	st.Memory = api.Usage{Used: int64(node.MemoryUsedMiB) * mib, Capacity: int64(node.MemoryCapacityMiB) * mib}
	st.VCPUs = api.Usage{Used: int64(node.VCPUsUsed), Capacity: int64(node.VCPUsCapacity)}
	st.Disk = api.Usage{Used: node.DiskCapacity - node.DiskFree, Capacity: node.DiskCapacity}
	return st, err
}
