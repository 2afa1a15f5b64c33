package main

import (
	"context"
	"time"

	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/instance"
	"github.com/alephvm/alephvm/message"
)

// instancesAPI gives the API the instance manager in the API's terms.
type instancesAPI struct{ m *instance.Manager }

func (i instancesAPI) Start(ctx context.Context, ref message.ItemHash) error {
	return i.m.Start(ctx, ref)
}
func (i instancesAPI) Stop(ctx context.Context, ref message.ItemHash) (bool, error) {
	return i.m.Stop(ctx, ref)
}
func (i instancesAPI) Reboot(ctx context.Context, ref message.ItemHash) error {
	return i.m.Reboot(ctx, ref)
}
func (i instancesAPI) Erase(ctx context.Context, ref message.ItemHash) error {
	return i.m.Erase(ctx, ref)
}
func (i instancesAPI) Running(ref message.ItemHash) bool { return i.m.Running(ref) }

func (i instancesAPI) Allocate(ctx context.Context, desired []message.ItemHash) api.AllocationResult {
	return api.AllocationResult(i.m.Allocate(ctx, desired))
}

func (i instancesAPI) Statuses(ctx context.Context) ([]api.InstanceStatus, error) {
	recs, err := i.m.List(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.InstanceStatus, 0, len(recs))
	for _, r := range recs {
		st := api.InstanceStatus{Ref: r.Ref, Running: i.m.Running(r.Ref), StartedAt: r.StartedAt, VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB,
			IPv4Network: r.IPv4Network, IPv4: r.IPv4}
		if st.Running {
			st.MappedPorts = api.MappedPorts(r.Forwards)
		}
		out = append(out, st)
	}
	return out, nil
}

// logsAPI gives the API the output of programs (their workload's stdout
// and stderr, through the init) and of instances (their serial console,
// where the kernel, systemd and cloud-init write).
type logsAPI struct{ n *node }

func (l logsAPI) Follow(ctx context.Context, ref message.ItemHash, fn func(api.LogLine) error) (bool, bool, error) {
	if buf := l.n.logs.Get(ref); buf != nil {
		ended, err := buf.Follow(ctx, func(line guest.LogLine) error {
			return fn(api.LogLine{Time: line.Time, Stream: string(line.Stream), Text: line.Text})
		})
		return true, ended, err
	}
	rec, err := l.n.records.Get(ctx, ref)
	if err != nil || rec.Kind != execution.KindInstance {
		return false, false, nil
	}
	ended, err := hypervisor.FollowConsole(ctx, rec.VMDir, func() bool { return l.n.instances.Running(ref) }, func(text string) error {
		return fn(api.LogLine{Time: time.Now(), Stream: "console", Text: text})
	})
	return true, ended, err
}
