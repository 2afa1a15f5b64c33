package main

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/console"
	"github.com/alephvm/alephvm/instance"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
	"github.com/alephvm/alephvm/program"
	"github.com/alephvm/alephvm/storage"
	"github.com/google/uuid"
)

// instancesAPI gives the API the instance manager in the API's terms.
type instancesAPI struct {
	m         *instance.Manager
	allocated string // the file of the last allocation's instances
	log       *slog.Logger
}

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
func (i instancesAPI) Run(ref message.ItemHash) (uint64, bool) { return i.m.Run(ref) }
func (i instancesAPI) StopRun(ctx context.Context, ref message.ItemHash, run uint64) (bool, error) {
	return i.m.StopRun(ctx, ref, run)
}
func (i instancesAPI) Reinstall(ctx context.Context, ref message.ItemHash, eraseVolumes bool) error {
	return i.m.Reinstall(ctx, ref, eraseVolumes)
}
func (i instancesAPI) UpdatePorts(ctx context.Context, ref message.ItemHash) (bool, error) {
	return i.m.UpdatePorts(ctx, ref)
}
func (i instancesAPI) Running(ref message.ItemHash) bool { return i.m.Running(ref) }

// machinesAPI tells the API who owns a VM the node hosts or hosted: the
// address its message's content names.
type machinesAPI struct{ n *node }

func (m machinesAPI) Machine(ctx context.Context, ref message.ItemHash) (api.Machine, error) {
	if _, err := m.n.records.Get(ctx, ref); errors.Is(err, execution.ErrNoRecord) {
		return api.Machine{}, api.ErrUnknownMachine
	} else if err != nil {
		return api.Machine{}, err
	}
	msg, _, err := m.n.store.Message(ctx, ref)
	if err != nil {
		return api.Machine{}, err
	}
	c, ok := msg.Content.(message.ExecutableContent)
	if !ok {
		return api.Machine{}, api.ErrUnknownMachine
	}
	return api.Machine{Owner: c.Executable().Address, Type: string(msg.Type)}, nil
}

func (i instancesAPI) Allocate(ctx context.Context, desired []message.ItemHash) api.AllocationResult {
	// Written before it is carried out: a node killed half way through
	// carries it out again when it starts.
	if err := writePersistent(i.allocated, desired); err != nil {
		i.log.Warn("the allocation will not be carried out again after a restart", "err", err)
	}
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
			IPv4Network: r.IPv4Network, IPv4: r.IPv4, IPv6Network: r.IPv6Network, IPv6: r.IPv6}
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
	// Past logs come with a context already done: the lookup must not.
	rec, err := l.n.records.Get(context.WithoutCancel(ctx), ref)
	if err != nil || rec.Kind != execution.KindInstance {
		return false, false, nil
	}
	path := filepath.Join(rec.VMDir, hypervisor.ConsoleLog)
	ended, err := console.Follow(ctx, path, console.DefaultLimits, func() bool { return l.n.instances.Running(ref) }, func(text string) error {
		return fn(api.LogLine{Time: time.Now(), Stream: "console", Text: text})
	})
	return true, ended, err
}

// programsAPI is the pool as the API uses it: the persistent programs the
// scheduler allocates are also written down (file), so that a restarted
// node starts them again before the scheduler's next allocation.
type programsAPI struct {
	*pool.Pool
	file string
	log  *slog.Logger
}

func (p programsAPI) SetPersistent(ctx context.Context, refs []message.ItemHash) map[message.ItemHash]error {
	errs := p.Pool.SetPersistent(ctx, refs)
	if err := writePersistent(p.file, p.Pool.Persistent()); err != nil {
		p.log.Warn("the persistent programs will not be started again after a restart", "err", err)
	}
	return errs
}

// writePersistent writes the persistent programs' refs to file, so that a
// crash leaves the last list or the one before, whole.
func writePersistent(file string, refs []message.ItemHash) error {
	slices.Sort(refs)
	data, err := json.Marshal(refs)
	if err != nil {
		return err
	}
	return storage.WriteFileDurable(file, data, 0o600)
}

// readPersistent reads a list of refs written by writePersistent: nil when there is none.
func readPersistent(file string, log *slog.Logger) map[message.ItemHash]bool {
	data, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var refs []message.ItemHash
	if err == nil {
		err = json.Unmarshal(data, &refs)
	}
	if err != nil {
		log.Warn("read the persistent programs", "file", file, "err", err)
		return nil
	}
	kept := map[message.ItemHash]bool{}
	for _, ref := range refs {
		kept[ref] = true
	}
	return kept
}

// adoptPersistent takes back the persistent programs left running by the
// node's last run.
func adoptPersistent(ctx context.Context, n *node, launcher *program.Launcher, hvs execution.Hypervisors, kept map[message.ItemHash]bool) {
	err := n.records.EachLive(ctx, execution.KindProgram, func(rec execution.Record) error {
		if !kept[rec.Ref] {
			return nil
		}
		plan, prog, err := launcher.Adopt(ctx, rec, hvs)
		if err != nil {
			n.log.Warn("a persistent program could not be taken back; it boots again", "ref", rec.Ref, "err", err)
			return nil
		}
		n.programs.Adopt(plan, prog)
		return nil
	})
	if err != nil {
		n.log.Error("take back persistent programs", "err", err)
	}
}

// restorePersistent keeps the persistent programs the last allocation
// listed: those taken back run on, the others boot again.
func restorePersistent(ctx context.Context, p *pool.Pool, file string, log *slog.Logger) {
	kept := readPersistent(file, log)
	if len(kept) == 0 {
		return
	}
	refs := make([]message.ItemHash, 0, len(kept))
	for ref := range kept {
		refs = append(refs, ref)
	}
	for ref, err := range p.SetPersistent(ctx, refs) {
		log.Warn("persistent program not kept", "ref", ref, "err", err)
	}
	log.Info("persistent programs kept", "count", len(refs))
}

// recordsAPI gives /about/executions/records from the node's records and
// the messages in its store.
type recordsAPI struct{ n *node }

func (r recordsAPI) ExecutionRecords(ctx context.Context) ([]api.ExecutionRecord, error) {
	var out []api.ExecutionRecord
	for _, kind := range []execution.Kind{execution.KindProgram, execution.KindInstance} {
		recs, err := r.n.records.List(ctx, kind)
		if err != nil {
			return nil, err
		}
		for _, rec := range recs {
			if rec.State == execution.StateStopped {
				continue // the reference's table holds live executions
			}
			row := api.ExecutionRecord{
				UUID: uuidOf(rec), VMHash: string(rec.Ref), TimeDefined: *api.RecordTime(rec.CreatedAt),
				TimePrepared: api.RecordTime(rec.CreatedAt), TimeStarted: api.RecordTime(rec.StartedAt),
				VCPUs: rec.VCPUs, Memory: rec.MemoryMiB, Persistent: kind == execution.KindInstance,
				GPUs: []any{}, MappedPorts: api.MappedPorts(rec.Forwards),
			}
			if rec.NetIndex >= 0 {
				row.VMID = &rec.NetIndex
			}
			if rec.Tap != "" {
				row.NetworkTap = &rec.Tap
			}
			if msg, _, err := r.n.store.Message(ctx, rec.Ref); err == nil {
				content, _ := json.Marshal(msg.Content)
				row.Message, row.OriginalMessage = content, content
			}
			if kind == execution.KindProgram {
				for _, e := range r.n.programs.List() {
					if e.Ref == rec.Ref && e.Plan != nil {
						row.Persistent = e.Plan.Persistent
					}
				}
			}
			out = append(out, row)
		}
	}
	return out, nil
}

// uuidOf is a stable id of one run of an execution (the reference's
// uuid1 per execution): its ref and creation time, as a version 5 UUID.
func uuidOf(rec execution.Record) string {
	return uuid.NewSHA1(uuid.NameSpaceOID, []byte(string(rec.Ref)+"@"+rec.CreatedAt.UTC().Format(time.RFC3339Nano))).String()
}

// eventsAPI delivers the reactor's messages through the pool: a program
// is booted for one as for a request, under the same admission.
type eventsAPI struct{ programs *pool.Pool }

// eventTaker is a program VM that takes events.
type eventTaker interface {
	DeliverEvent(ctx context.Context, body []byte) error
}

func (e eventsAPI) Deliver(ctx context.Context, ref message.ItemHash, event []byte) error {
	lease, err := e.programs.Acquire(ctx, ref)
	if err != nil {
		return err
	}
	defer lease.Release()
	taker, ok := lease.Program().(eventTaker)
	if !ok {
		return errors.New("this program's VM takes no events")
	}
	return taker.DeliverEvent(ctx, event)
}

// reallocate carries out again, in the background, the last allocation's
// instances: a node killed while it carried it out left some instances
// running that it had to stop, or stopped some it had not started again.
// A node that never received an allocation changes nothing.
func reallocate(ctx context.Context, m *instance.Manager, file string, log *slog.Logger) {
	listed := readPersistent(file, log)
	if listed == nil {
		return
	}
	refs := slices.Sorted(maps.Keys(listed))
	go func() {
		res := m.Allocate(ctx, refs)
		log.Info("last allocation carried out again", "instances", len(refs), "stopped", len(res.Stopped), "failing", len(res.Failing))
		for ref, err := range res.Errors {
			log.Warn("instance of the last allocation", "ref", ref, "err", err)
		}
	}()
}
