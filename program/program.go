// Package program launches program VMs: it turns a PROGRAM message into
// drives, a config drive for the guest init, a network and a VM spec for
// its hypervisor (QEMU or Firecracker),
// boots the VM, waits for the workload to listen, collects its output, and
// releases everything it took when it stops, on every path. It implements
// pool.Launcher.
package program

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/release"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
	"github.com/alephvm/alephvm/pool"
	"github.com/alephvm/alephvm/snapshot"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

// Options configure the program launcher.
type Options struct {
	Store execution.Store
	// Hypervisor runs the programs; when nil, Unavailable says why none
	// can run here.
	Hypervisor  execution.Hypervisor
	Unavailable error
	Networks    execution.Networks
	Records     *execution.Records
	Kernel      execution.Kernel
	// RunDir holds each running VM's directory (sockets, config drive,
	// ephemeral volumes); VolumesDir the persistent volumes, by program.
	RunDir     string
	VolumesDir string
	// Disks makes the volumes, refusing those their filesystem cannot
	// hold; the zero value reads free space with statfs.
	Disks storage.Disks
	// DiskSpace promises the space of the program's writable volumes
	// before anything is made (507 when the filesystem cannot hold them);
	// nil checks each disk only as it is made (Disks).
	DiskSpace *diskusage.Ledger
	DNS       []netip.Addr
	// ReadyTimeout bounds the wait for the workload to accept connections.
	ReadyTimeout time.Duration
	Logs         *LogArchive
	// ColdStarts, if set, is told of each start, with its phases.
	ColdStarts execution.StartObserver
	// Node is what messages' requirements are checked against.
	Node execution.Node
	// GuestAPI answers the guest API calls of each program's workload
	// (package guestapi); nil leaves them unanswered (503 in the guest).
	GuestAPI GuestAPI
	// Templates, if set, restores program VMs from snapshots (QEMU only);
	// TemplateInputs are the node's part of a template's inputs (the
	// hypervisor, kernel and initramfs hashes). Any failure to restore
	// boots the VM instead.
	Templates      Templates
	TemplateInputs snapshot.Inputs
	// ProgramSnapshots also snapshots each eligible program after its
	// first start (its workload ready, no network), and restores its
	// later cold starts from that.
	ProgramSnapshots bool
	Log              *slog.Logger
}

// Templates are the snapshots program VMs restore from.
type Templates interface {
	// Get returns the template of in, or nil when it is not built yet
	// (its build then starts).
	Get(ctx context.Context, in snapshot.Inputs, boot hypervisor.Boot) *snapshot.Template
	// Drop forgets a template a restore failed from.
	Drop(key string, why error)
	// GetProgram returns a program's own snapshot, or nil.
	GetProgram(key string) *snapshot.Template
	// BuildProgram builds a program's own snapshot in the background.
	BuildProgram(key string, build snapshot.BuildFunc)
}

// Launcher launches program VMs; it implements pool.Launcher.
type Launcher struct {
	opts Options
}

// New returns a program launcher.
func New(opts Options) *Launcher {
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 2 * time.Minute
	}
	return &Launcher{opts: opts}
}

// items are the refs a program is made of, with their use_latest flags.
func programItems(c *message.ProgramContent) []itemRef {
	items := []itemRef{
		{"runtime", c.Runtime.Ref, c.Runtime.UseLatest},
		{"code", c.Code.Ref, c.Code.UseLatest},
	}
	if c.Data != nil {
		items = append(items, itemRef{"data", c.Data.Ref, c.Data.UseLatest != nil && *c.Data.UseLatest})
	}
	for i, v := range c.Volumes {
		if v.Kind() == message.VolumeImmutable {
			items = append(items, itemRef{"volume " + strconv.Itoa(i), v.Ref, v.UseLatest})
		}
	}
	return items
}

type itemRef struct {
	what      string
	ref       message.ItemHash
	useLatest bool
}

// Plan implements pool.Launcher: it reads the program's message and
// resolves its items, so that the plan's revision changes when an amend
// replaces one of them. Nothing is downloaded before the pool admits the
// program: Boot fetches the files.
func (p *Launcher) Plan(ctx context.Context, ref message.ItemHash) (*pool.Plan, error) {
	msg, _, err := p.opts.Store.Message(ctx, ref)
	if err != nil {
		return nil, execution.StoreError("Message", ref, err)
	}
	content, ok := msg.Content.(*message.ProgramContent)
	if !ok {
		return nil, &execution.Error{Status: 400, Msg: fmt.Sprintf("Message %s is a %s, not a PROGRAM", ref, msg.Type)}
	}
	if err := execution.CheckRequirements(content.ExecutableBase, content.Environment, p.opts.Node); err != nil {
		return nil, err
	}
	h := sha256.New()
	for _, it := range programItems(content) {
		item, err := p.opts.Store.Resolve(ctx, it.ref, it.useLatest)
		if err != nil {
			return nil, execution.StoreError("Item", it.ref, err)
		}
		fmt.Fprintf(h, "%s=%s;", it.what, item.ItemHash)
	}
	res := content.Resources
	return &pool.Plan{
		Ref:        ref,
		Revision:   hex.EncodeToString(h.Sum(nil))[:16],
		VCPUs:      int(res.VCPUs),
		MemoryMiB:  int(res.MemoryMiB),
		Timeout:    time.Duration(res.Seconds) * time.Second,
		CodeRef:    content.Code.Ref,
		Message:    msg,
		Persistent: content.On.Persistent != nil && *content.On.Persistent,
	}, nil
}

// Boot implements pool.Launcher.
func (p *Launcher) Boot(ctx context.Context, plan *pool.Plan) (pool.Program, error) {
	content, ok := plan.Message.Content.(*message.ProgramContent)
	if !ok {
		return nil, fmt.Errorf("plan of %s: not a PROGRAM message", plan.Ref)
	}
	if p.opts.Hypervisor == nil {
		return nil, &execution.Error{Status: 503, Msg: "this node cannot run programs", Err: p.opts.Unavailable}
	}
	boot, err := p.opts.Kernel.Boot(p.opts.Hypervisor.Name())
	if err != nil {
		return nil, &execution.Error{Status: 503, Msg: "this node cannot run programs: it has no guest kernel (alephvm assets build, or LINUX_PATH and INITRD_PATH)", Err: err}
	}
	vm := &programVM{opts: &p.opts, ref: plan.Ref, done: make(chan struct{}), log: p.opts.Log.With("ref", plan.Ref)}
	if err := vm.start(ctx, content, boot); err != nil {
		// A VM that started and then failed (no control channel, not
		// ready, a record not written) is stopped too: nothing else would
		// ever reclaim it.
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		_ = vm.Stop(stopCtx) // logged by Stop
		return nil, err
	}
	return vm, nil
}

// programVM is one running program.
type programVM struct {
	opts   *Options
	ref    message.ItemHash
	log    *slog.Logger
	dir    string
	att    network.Attachment
	vm     execution.VM
	client *guest.Client
	logs   *LogBuffer
	// What start builds, phase after phase.
	content *message.ProgramContent
	boot    hypervisor.Boot
	files   programFiles
	spec    hypervisor.Spec
	cfg     guest.Config
	status  guest.Status // when the workload got ready
	// restored says the VM was restored from a template, not booted;
	// fromProgramSnapshot, from the program's own snapshot.
	restored, fromProgramSnapshot bool
	// afterStart, if set, runs once the VM is ready (a program's snapshot
	// build to start).
	afterStart func()
	// made holds the release of everything start made, added as it is
	// made; a failed start and Stop release it.
	made release.List

	stopOnce sync.Once
	stopErr  error
	done     chan struct{}
}

func (v *programVM) start(ctx context.Context, c *message.ProgramContent, boot hypervisor.Boot) (err error) {
	v.content, v.boot = c, boot
	timing := execution.StartTiming()
	defer func() { timing.Report(v.opts.ColdStarts, v.ref, Type(c), err) }()
	for _, phase := range []struct {
		name string
		run  func(context.Context) error
	}{
		{"disk space", v.reserveDisks},
		{"network", v.attach},
		{"fetch", v.fetchFiles},
		{"disks", v.makeDisks},
		{"hypervisor", v.launch},
		{"control", v.connect},
		{"ready", v.waitReady},
	} {
		if err := phase.run(ctx); err != nil {
			return err
		}
		timing.Done(phase.name)
	}
	b := v.status.Boot
	if v.fromProgramSnapshot {
		// Its workload started in the snapshot's VM.
		v.log.Info("program started", "restored", true, "program_snapshot", true, "phases", timing, "ip", v.att.Guest)
	} else {
		v.logStarted(timing, b)
	}
	if v.opts.Records != nil {
		if err := v.opts.Records.SetState(ctx, v.ref, execution.StateRunning); err != nil {
			return err
		}
	}
	go v.watch()
	if v.afterStart != nil {
		v.afterStart()
	}
	return nil
}

// logStarted logs a started program with the guest's own steps: from its
// resume for a VM restored from a template (its clock is the template's
// boot clock, carried on), from its kernel's start for a booted one.
func (v *programVM) logStarted(timing *execution.Timing, b guest.Boot) {
	v.log.Info("program started", "restored", v.restored, "phases", timing, "guest.boot", b.Config-b.Resume,
		"guest.mounts", b.Mounts-b.Config, "guest.network", b.Network-b.Mounts, "guest.started", b.Started-b.Network,
		"guest.ready", b.Ready-b.Started, "kernel_to_ready", b.Ready-b.Resume, "ip", v.att.Guest)
}

// reserveDisks promises the space of the program's writable volumes.
func (v *programVM) reserveDisks(context.Context) error {
	if v.opts.DiskSpace == nil {
		return nil
	}
	release, err := v.opts.DiskSpace.Reserve("program "+string(v.ref), diskusage.DiskBytes(0, v.content.Volumes),
		filepath.Join(v.opts.VolumesDir, string(v.ref)))
	if err != nil {
		return &execution.Error{Status: 507, Msg: "not enough disk space for the VM's disks", Err: err}
	}
	v.made.AddFunc("disk space", release)
	return nil
}

// attach gives the VM its network and its runtime directory, named
// after its tap.
func (v *programVM) attach(context.Context) error {
	kind := network.KindProgram
	if Type(v.content) == execution.TypePersistentProgram {
		kind = network.KindPersistentProgram
	}
	att, err := v.opts.Networks.Attach(network.AttachRequest{Owner: string(v.ref), Kind: kind, Index: -1, Internet: v.content.Environment.Internet})
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	v.att = att
	v.made.Add("network", func(context.Context) error { return v.opts.Networks.Detach(string(v.ref)) })
	v.dir = filepath.Join(v.opts.RunDir, att.Tap)
	if err := os.RemoveAll(v.dir); err != nil {
		return err
	}
	if err := os.MkdirAll(v.dir, 0o700); err != nil {
		return fmt.Errorf("runtime directory: %w", err)
	}
	v.made.Add("runtime directory", func(context.Context) error { return os.RemoveAll(v.dir) })
	return nil
}

// fetchFiles fetches the program's files from the store.
func (v *programVM) fetchFiles(ctx context.Context) (err error) {
	v.files, err = v.fetchAll(ctx, v.content)
	return err
}

// makeDisks makes the writable volumes and writes the config drive.
func (v *programVM) makeDisks(ctx context.Context) error {
	drives := v.files.drives
	for i, vol := range v.content.Volumes {
		if d, ok := v.files.volumes[i]; ok {
			drives = append(drives, d)
			continue
		}
		d, err := v.volume(ctx, i, vol)
		if err != nil {
			return fmt.Errorf("volume %d: %w", i, err)
		}
		drives = append(drives, d)
	}
	v.cfg, v.spec = programSpec(specInputs{Ref: v.ref, Content: v.content, Drives: drives, Network: v.att, DNS: v.opts.DNS, Boot: v.boot, Dir: v.dir})
	return guest.WriteConfigDrive(v.spec.Drives[0].Path, v.cfg)
}

// launch records the VM, then starts it: the record comes first, so that
// a node that dies while the VM boots leaves a VM the next one finds
// (StopOrphans).
func (v *programVM) launch(ctx context.Context) error {
	att, spec := v.att, v.spec
	if v.opts.Records != nil {
		rec := execution.Record{Ref: v.ref, Kind: execution.KindProgram, State: execution.StateStarting, Hypervisor: v.opts.Hypervisor.Name(),
			VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB, NetIndex: att.Index, Tap: att.Tap, IPv4Network: att.Network.String(),
			IPv4: att.Guest.String(), IPv6Network: addrText(att.IPv6.Network), IPv6: addrText(att.IPv6.Guest), VMDir: v.dir}
		if err := v.opts.Records.Put(ctx, rec); err != nil {
			return err
		}
		v.made.Add("record", func(ctx context.Context) error {
			return v.opts.Records.SetState(context.WithoutCancel(ctx), v.ref, execution.StateStopped)
		})
	}
	if v.restore(ctx) {
		return nil
	}
	vm, err := v.opts.Hypervisor.Start(ctx, spec)
	if err != nil {
		return err
	}
	v.holdVM(vm)
	return nil
}

// restore starts the VM from the program's own snapshot, or else from its
// template, if there is one, and resumes it. It reports whether the VM
// runs; on any failure the restored VM is stopped, the snapshot dropped,
// and the caller boots.
func (v *programVM) restore(ctx context.Context) bool {
	if v.opts.Templates == nil || v.opts.Hypervisor.Name() != hypervisor.QEMU {
		return false
	}
	in := v.opts.TemplateInputs
	in.Runtime, in.Cmdline = string(v.content.Runtime.Ref), v.boot.Cmdline
	in.VCPUs, in.MemoryMiB = v.spec.VCPUs, v.spec.MemoryMiB
	own := ""
	if v.opts.ProgramSnapshots && v.snapshotEligible() {
		own = programSnapshotKey(in.Key(), v.ref, v.spec)
		if t := v.opts.Templates.GetProgram(own); t != nil {
			spec := v.spec
			spec.Drives = append([]hypervisor.Drive(nil), spec.Drives...)
			spec.Drives[0].Path = t.File(programSnapshotConfig)
			if v.restoreWith(ctx, t, spec, v.cfg.Network) {
				v.fromProgramSnapshot = true
				return true
			}
		}
	}
	t := v.opts.Templates.Get(ctx, in, v.boot)
	if t == nil {
		return false
	}
	if !v.restoreWith(ctx, t, v.spec, nil) {
		return false
	}
	if own != "" {
		v.afterStart = func() { v.opts.Templates.BuildProgram(own, v.programSnapshotBuild(t, in)) }
	}
	return true
}

// restoreWith restores the VM of spec from t; network is given to the
// guest for a program's snapshot.
func (v *programVM) restoreWith(ctx context.Context, t *snapshot.Template, spec hypervisor.Spec, network *guest.Network) bool {
	started := time.Now()
	vm, client, loaded, err := v.restoreFrom(ctx, t, spec, network)
	if err != nil {
		v.log.Warn("restore from the template failed: booting instead", "template", t.Key()[:16], "program_snapshot", t.Program != "", "err", err)
		v.opts.Templates.Drop(t.Key(), err)
		return false
	}
	v.restored = true
	v.holdVM(vm)
	v.useClient(client)
	v.log.Info("program VM restored from its template", "template", t.Key()[:16], "program_snapshot", t.Program != "",
		"qemu_and_state", loaded.Round(time.Millisecond), "took", time.Since(started).Round(time.Millisecond))
	return true
}

// restoreFrom starts a VM from t and resumes its init; a VM that started
// is stopped on failure.
func (v *programVM) restoreFrom(ctx context.Context, t *snapshot.Template, spec hypervisor.Spec, network *guest.Network) (_ execution.VM, _ *guest.Client, loaded time.Duration, err error) {
	started := time.Now()
	vm, err := v.opts.Hypervisor.Start(ctx, t.Apply(spec))
	if err != nil {
		return nil, nil, 0, err
	}
	loaded = time.Since(started)
	var client *guest.Client
	defer func() {
		if err != nil {
			if client != nil {
				client.Close()
			}
			stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			_ = vm.Stop(stopCtx, nil, stopTimeouts)
		}
	}()
	if client, err = resumeVM(ctx, vm, network); err != nil {
		return vm, nil, loaded, err
	}
	if network == nil {
		if err = waitStarted(ctx, client); err != nil {
			err = fmt.Errorf("%w; console: %s", err, consoleTail(vm.ConsoleLog(), 2048))
		}
	}
	return vm, client, loaded, err
}

// restoreStartTimeout bounds the steps of a VM restored from a template
// up to its workload's start (a second or two here): past it, the VM is
// taken for stuck and the program boots instead.
const restoreStartTimeout = 30 * time.Second

// waitStarted waits for a resumed init to start the workload (or fail).
func waitStarted(ctx context.Context, client *guest.Client) error {
	ctx, cancel := context.WithTimeout(ctx, restoreStartTimeout)
	defer cancel()
	for {
		st, err := client.Status(ctx)
		if err == nil && (st.Boot.Started != 0 || st.State != guest.StateStarting) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the restored VM did not start the workload within %s (last: %s, %+v)", restoreStartTimeout, st.State, st.Boot)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// consoleTail is the end of a console log, for an error message.
func consoleTail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err.Error()
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	n2, _ := f.ReadAt(b, off)
	return strconv.Quote(string(b[:n2]))
}

// resumeVM opens the control channel of a VM restored from a template
// and resumes it: a template's init is waiting, a program's snapshot's is
// ready and gets its network.
func resumeVM(ctx context.Context, vm execution.VM, network *guest.Network) (*guest.Client, error) {
	helloCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := vm.DialControl(helloCtx)
	if err != nil {
		return nil, fmt.Errorf("control channel: %w", err)
	}
	client, err := guest.NewClient(helloCtx, conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("control channel: %w", err)
	}
	want := guest.StateWaiting
	if network != nil {
		want = guest.StateReady
	}
	if st := client.Hello().Status; st.State != want {
		client.Close()
		return nil, fmt.Errorf("the restored init is %s, not %s", st.State, want)
	}
	seed, err := snapshot.NewSeed()
	if err == nil {
		err = client.Resume(helloCtx, guest.ResumeRequest{Time: time.Now(), Seed: seed, Network: network})
	}
	if err == nil {
		// The status the client holds is the template's until asked.
		_, err = client.Status(helloCtx)
	}
	if err != nil {
		client.Close()
		return nil, err
	}
	return client, nil
}

// programSnapshotConfig is the config drive a program's snapshot keeps:
// the one its guest read.
const programSnapshotConfig = "config.img"

// snapshotEligible says whether the program may have a snapshot of its
// own: not persistent, and every drive but the config drive read-only
// (store items, the same bytes in every VM of the program).
func (v *programVM) snapshotEligible() bool {
	if Type(v.content) == execution.TypePersistentProgram {
		return false
	}
	for _, d := range v.spec.Drives[1:] {
		if !d.ReadOnly {
			return false
		}
	}
	return true
}

// programSnapshotKey names a program's snapshot: its template's key, the
// program, and its drives' files (store items, named by their hash).
func programSnapshotKey(templateKey string, ref message.ItemHash, spec hypervisor.Spec) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n", templateKey, ref)
	for _, d := range spec.Drives[1:] {
		fmt.Fprintf(h, "%s\n", d.Path)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// programSnapshotBuild is the build of the program's own snapshot: a VM
// restored from t with the program's drives and no NIC, whose workload is
// started, then saved with its RAM in its own file.
func (v *programVM) programSnapshotBuild(t *snapshot.Template, in snapshot.Inputs) snapshot.BuildFunc {
	cfg, spec, ref := v.cfg, v.spec, v.ref
	spec.Drives = append([]hypervisor.Drive(nil), spec.Drives...)
	hv := v.opts.Hypervisor
	return func(ctx context.Context, dir string) (_ snapshot.Built, err error) {
		built := snapshot.Built{Inputs: in, Boot: t.Boot(), Program: string(ref), Files: []string{programSnapshotConfig}}
		cfg.Network = nil
		spec.Name, spec.Dir, spec.NICs = "snap-"+string(ref)[:12], dir, nil
		spec.Drives[0].Path = filepath.Join(dir, programSnapshotConfig)
		if err := guest.WriteConfigDrive(spec.Drives[0].Path, cfg); err != nil {
			return built, err
		}
		if err := t.CopyMemory(filepath.Join(dir, snapshot.MemoryFile)); err != nil {
			return built, fmt.Errorf("copy the template's RAM: %w", err)
		}
		spec = t.Apply(spec)
		spec.Memory = &hypervisor.Memory{Path: filepath.Join(dir, snapshot.MemoryFile), Shared: true}
		vm, err := hv.Start(ctx, spec)
		if err != nil {
			return built, err
		}
		stopped := false
		defer func() {
			if !stopped {
				stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
				defer cancel()
				_ = vm.Stop(stopCtx, nil, stopTimeouts)
			}
		}()
		client, err := resumeVM(ctx, vm, nil)
		if err != nil {
			return built, err
		}
		defer client.Close()
		st, err := client.WaitFor(ctx, guest.Settled)
		if err != nil {
			return built, err
		}
		if st.State != guest.StateReady {
			return built, fmt.Errorf("the program did not start without a network: %s", describeStatus(st))
		}
		saver, ok := vm.(interface {
			SaveState(context.Context, string) error
		})
		if !ok {
			return built, errors.New("this hypervisor cannot save a VM")
		}
		if err := saver.SaveState(ctx, filepath.Join(dir, snapshot.StateFile)); err != nil {
			return built, err
		}
		stopped = true
		client.Close()
		stopCtx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		return built, vm.Stop(stopCtx, nil, snapshotStop)
	}
}

// snapshotStop ends a saved (paused) VM: QEMU's quit first.
var snapshotStop = hypervisor.StopTimeouts{Quit: 10 * time.Second, Kill: 5 * time.Second}

// holdVM makes vm the program's VM, stopped by the release list: the init
// is asked to halt when the control channel is up; QEMU escalates if it
// does not. The channel closes once the VM is gone.
func (v *programVM) holdVM(vm execution.VM) {
	v.vm = vm
	v.made.Add("vm", func(ctx context.Context) error {
		var halt func(context.Context) error
		if v.client != nil {
			halt = v.client.Halt
		}
		err := vm.Stop(ctx, halt, stopTimeouts)
		if v.client != nil {
			v.client.Close()
		}
		if v.logs != nil {
			v.opts.Logs.Finish(v.ref, v.logs)
		}
		return err
	})
}

// Adopt takes back the VM of a persistent program that an earlier node
// process left running (rec): the same tap and addresses, its files
// pinned, its VM attached and a new control session, as instances are
// taken back. A VM that cannot be taken back is stopped and released.
func (p *Launcher) Adopt(ctx context.Context, rec execution.Record, hvs execution.Hypervisors) (_ *pool.Plan, _ pool.Program, err error) {
	plan, err := p.Plan(ctx, rec.Ref)
	if err != nil {
		return nil, nil, err
	}
	c := plan.Message.Content.(*message.ProgramContent)
	v := &programVM{opts: &p.opts, ref: rec.Ref, done: make(chan struct{}), log: p.opts.Log.With("ref", rec.Ref), content: c, dir: rec.VMDir}
	defer func() {
		if err != nil {
			_ = v.Stop(context.WithoutCancel(ctx))
		}
	}()
	if v.att, err = p.opts.Networks.Attach(network.AttachRequest{Owner: string(rec.Ref), Kind: network.KindPersistentProgram,
		Index: rec.NetIndex, Internet: c.Environment.Internet}); err != nil {
		return nil, nil, fmt.Errorf("network: %w", err)
	}
	v.made.Add("network", func(context.Context) error { return p.opts.Networks.Detach(string(rec.Ref)) })
	v.made.Add("runtime directory", func(context.Context) error { return os.RemoveAll(rec.VMDir) })
	if p.opts.Records != nil {
		v.made.Add("record", func(ctx context.Context) error {
			return p.opts.Records.SetState(context.WithoutCancel(ctx), rec.Ref, execution.StateStopped)
		})
	}
	if v.files, err = v.fetchAll(ctx, c); err != nil {
		return nil, nil, err
	}
	hv, err := hvs.Get(rec.HypervisorName())
	if err != nil {
		return nil, nil, err
	}
	vm, err := hv.Attach(ctx, rec.VMDir)
	if err != nil {
		return nil, nil, fmt.Errorf("attach the VM: %w", err)
	}
	v.holdVM(vm)
	if err := v.connect(ctx); err != nil {
		return nil, nil, err
	}
	if err := v.waitReady(ctx); err != nil {
		return nil, nil, err
	}
	go v.watch()
	v.log.Info("persistent program taken back", "ip", v.att.Guest)
	return plan, v, nil
}

// Detach ends the node's session with the VM and leaves it running: a
// persistent program outlives the node, which takes it back (Adopt).
func (v *programVM) Detach() {
	v.stopOnce.Do(func() {
		if v.client != nil {
			v.client.Close()
		}
		close(v.done)
	})
}

// waitReady waits for the workload to listen, or to fail.
func (v *programVM) waitReady(ctx context.Context) error {
	readyCtx, cancel := context.WithTimeout(ctx, v.opts.ReadyTimeout)
	defer cancel()
	st, err := v.client.WaitFor(readyCtx, func(s guest.Status) bool { return s.State != guest.StateStarting && s.State != guest.StateRunning })
	if err != nil {
		return fmt.Errorf("wait for the program to listen on port %d: %w (console: %s)", guest.Port, err, v.vm.ConsoleLog())
	}
	if st.State != guest.StateReady {
		return &execution.Error{Status: 502, Msg: "program did not start: " + describeStatus(st) + lastLines(v.logs)}
	}
	v.status = st
	return nil
}

// connect opens the control channel and starts collecting the program's
// output.
func (v *programVM) connect(ctx context.Context) error {
	if v.client != nil {
		return nil // restored: connected to resume it
	}
	helloCtx, cancel := context.WithTimeout(ctx, v.opts.ReadyTimeout)
	defer cancel()
	conn, err := v.vm.DialControl(helloCtx)
	if err != nil {
		return fmt.Errorf("control channel: %w (console: %s)", err, v.vm.ConsoleLog())
	}
	client, err := guest.NewClient(helloCtx, conn)
	if err != nil {
		conn.Close()
		// The guest's last words say why it never answered (its init
		// failed, its kernel panicked), or that it was cut short.
		return fmt.Errorf("control channel: %w (console: %s, ending %s)", err, v.vm.ConsoleLog(), consoleTail(v.vm.ConsoleLog(), 2048))
	}
	v.useClient(client)
	return nil
}

// useClient makes client the VM's control session and starts collecting
// the program's output and serving its guest API.
func (v *programVM) useClient(client *guest.Client) {
	v.client = client
	v.logs = v.opts.Logs.Start(v.ref)
	go func() {
		_ = client.Logs(context.Background(), true, v.logs.Add)
	}()
	if v.opts.GuestAPI != nil {
		// For the session's life: it ends with the VM.
		go func() {
			if err := client.ServeAPI(context.Background(), v.opts.GuestAPI.Handler(v.ref)); err != nil && client.Err() == nil {
				v.log.Warn("the guest API is not served", "err", err)
			}
		}()
	}
}

// GuestAPI gives the guest API of each program's VM.
type GuestAPI interface {
	Handler(ref message.ItemHash) guest.APIHandler
}

// watch stops the VM when its workload ends or the VM dies: the pool then
// boots a fresh one for the next request.
func (v *programVM) watch() {
	events := v.client.Events()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				// The channel closed (the guest hung up): only the VM's
				// end is left to wait for.
				events = nil
				continue
			}
			if ev.Type == guest.EventExited || ev.Type == guest.EventFailed {
				v.log.Warn("program workload ended", "status", describeStatus(ev.Status))
				v.logs.System("program ended: " + describeStatus(ev.Status))
				go v.Stop(context.Background())
				return
			}
			if ev.Type == guest.EventOOM {
				v.logs.System("the out-of-memory killer killed a process of the program")
			}
		case <-v.vm.Done():
			go v.Stop(context.Background())
			return
		}
	}
}

// Type is the type of VM a program runs as: persistent or not.
func Type(c *message.ProgramContent) string {
	if c.On.Persistent != nil && *c.On.Persistent {
		return execution.TypePersistentProgram
	}
	return execution.TypeProgram
}

func describeStatus(s guest.Status) string {
	switch {
	case s.Error != "":
		return string(s.State) + ": " + s.Error
	case s.OOMKilled && s.ExitCode != nil:
		return fmt.Sprintf("%s with code %d (killed by the out-of-memory killer)", s.State, *s.ExitCode)
	case s.ExitCode != nil:
		return fmt.Sprintf("%s with code %d", s.State, *s.ExitCode)
	}
	return string(s.State)
}

// lastLines appends the program's last output to an error message.
func lastLines(b *LogBuffer) string {
	if b == nil {
		return ""
	}
	lines := b.Tail(20)
	if len(lines) == 0 {
		return ""
	}
	var sb strings.Builder
	sb.WriteString("; last output:")
	for _, l := range lines {
		sb.WriteString("\n" + l.Text)
	}
	return sb.String()
}

func encodingFormat(e message.Encoding) guest.Format {
	switch e {
	case message.EncodingZip:
		return guest.FormatZip
	case message.EncodingPlain:
		return guest.FormatFile
	}
	return guest.FormatSquashfs
}

func codeDrive(c message.CodeContent, size int64) guest.Drive {
	return guest.Drive{Role: guest.RoleCode, Format: encodingFormat(c.Encoding), Mount: "/opt/code", ReadOnly: true, Size: size}
}

func (v *programVM) fetch(ctx context.Context, what string, ref message.ItemHash, useLatest bool) (*store.Item, error) {
	item, err := v.opts.Store.Fetch(ctx, ref, useLatest)
	if err != nil {
		return nil, execution.StoreError(strings.ToUpper(what[:1])+what[1:], ref, err)
	}
	v.made.AddFunc(what, item.Release)
	return item, nil
}

// programFiles are the files of a program fetched from the store, as
// drives of its VM.
type programFiles struct {
	drives  []drivePlan       // runtime, code, data
	volumes map[int]drivePlan // immutable volumes, by their index in the message
}

// fetchAll fetches (downloading what is missing) every file the program
// names, and pins it until the VM is gone.
func (v *programVM) fetchAll(ctx context.Context, c *message.ProgramContent) (programFiles, error) {
	f := programFiles{volumes: map[int]drivePlan{}}
	runtime, err := v.fetch(ctx, "runtime", c.Runtime.Ref, c.Runtime.UseLatest)
	if err != nil {
		return f, err
	}
	f.drives = append(f.drives, drivePlan{runtime.Path, guest.Drive{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true}})
	code, err := v.fetch(ctx, "code", c.Code.Ref, c.Code.UseLatest)
	if err != nil {
		return f, err
	}
	f.drives = append(f.drives, drivePlan{code.Path, codeDrive(c.Code, code.Size)})
	if c.Data != nil {
		data, err := v.fetch(ctx, "data", c.Data.Ref, c.Data.UseLatest != nil && *c.Data.UseLatest)
		if err != nil {
			return f, err
		}
		// The reference unpacks the data at /data whatever data.mount says.
		f.drives = append(f.drives, drivePlan{data.Path, guest.Drive{Role: guest.RoleData, Format: encodingFormat(c.Data.Encoding), Mount: "/data", Size: data.Size}})
	}
	for i, vol := range c.Volumes {
		if vol.Kind() != message.VolumeImmutable {
			continue
		}
		d, err := v.volume(ctx, i, vol)
		if err != nil {
			return f, fmt.Errorf("volume %d: %w", i, err)
		}
		f.volumes[i] = d
	}
	return f, nil
}

// volumeMount is where a volume is mounted: its mount point, else
// /mnt/<name>, as the reference does.
func volumeMount(i int, vol message.MachineVolume) string {
	if vol.Mount != nil && *vol.Mount != "" {
		return *vol.Mount
	}
	return "/mnt/" + volumeName(i, vol)
}

func volumeName(i int, vol message.MachineVolume) string {
	if vol.Name != nil && *vol.Name != "" {
		return execution.SafeName.ReplaceAllString(*vol.Name, "_")
	}
	return fmt.Sprintf("volume-%d", i)
}

// volume prepares one volume of the message: an immutable one fetched,
// an ephemeral one made fresh in the VM's directory, a persistent one kept
// under VolumesDir for the program.
func (v *programVM) volume(ctx context.Context, i int, vol message.MachineVolume) (drivePlan, error) {
	name := volumeName(i, vol)
	place := execution.VolumePlace{Path: filepath.Join(v.dir, fmt.Sprintf("ephemeral-%d.ext4", i))}
	persistent := vol.Kind() == message.VolumePersistent
	if persistent {
		file := storage.VolumeFileName("", i)
		if vol.Name != nil {
			file = storage.VolumeFileName(*vol.Name, i)
		}
		place = execution.VolumePlace{Path: filepath.Join(v.opts.VolumesDir, string(v.ref), file+".ext4"), Label: name}
	}
	prepared, err := execution.PrepareVolume(ctx, v.opts.Store, v.opts.Disks, vol, place)
	if err != nil {
		return drivePlan{}, err
	}
	if prepared.Release != nil {
		v.made.AddFunc("volume "+strconv.Itoa(i), prepared.Release)
	}
	d := guest.Drive{Role: guest.RoleVolume, Format: guest.FormatExt4, Mount: volumeMount(i, vol), ReadOnly: prepared.ReadOnly}
	switch {
	case prepared.ReadOnly:
		d.Format = guest.FormatSquashfs
	case persistent:
		d.Persistent, d.Name = true, name
	}
	return drivePlan{prepared.Path, d}, nil
}

// Target implements pool.Program.
func (v *programVM) Target() *url.URL {
	return &url.URL{Scheme: "http", Host: net.JoinHostPort(v.att.Guest.String(), strconv.Itoa(guest.Port))}
}

// DeliverEvent hands its workload a message it subscribes to.
func (v *programVM) DeliverEvent(ctx context.Context, body []byte) error {
	return v.client.DeliverEvent(ctx, body)
}

// VM is the program's VM, for the node's metrics.
func (v *programVM) VM() execution.VM { return v.vm }

// Hypervisor is the backend the program runs under.
func (v *programVM) Hypervisor() string { return v.opts.Hypervisor.Name() }

// Done implements pool.Program.
func (v *programVM) Done() <-chan struct{} { return v.done }

// Networking implements pool.Program.
func (v *programVM) Networking() pool.Networking {
	return pool.Networking{IPv4Network: v.att.Network.String(), HostIPv4: v.att.Host.String(), IPv4: v.att.Guest.String(),
		IPv6Network: addrText(v.att.IPv6.Network), IPv6: addrText(v.att.IPv6.Guest), Tap: v.att.Tap}
}

// addrText is an address or prefix as text, "" when there is none.
func addrText(a interface {
	IsValid() bool
	String() string
}) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// stopTimeouts suit a program: its init halts in about a second, and has
// nothing to do with the ACPI power button or ctrl-alt-del.
var stopTimeouts = hypervisor.StopTimeouts{Halt: 15 * time.Second, Shutdown: time.Second, Quit: 10 * time.Second, Kill: 5 * time.Second}

// Stop implements pool.Program: the init unmounts everything and powers
// off (QEMU escalates if it does not), then everything the VM held is
// released.
func (v *programVM) Stop(ctx context.Context) error {
	v.stopOnce.Do(func() {
		v.stopErr = v.made.Release(ctx)
		if v.stopErr != nil {
			v.log.Error("release program VM", "err", v.stopErr)
		}
		close(v.done)
	})
	return v.stopErr
}

// EraseVolumes deletes the persistent volumes of program ref, which must
// not be running.
func (p *Launcher) EraseVolumes(ref message.ItemHash) error {
	if _, err := message.ParseItemHash(string(ref)); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(p.opts.VolumesDir, string(ref))); err != nil {
		return fmt.Errorf("erase volumes of %s: %w", ref, err)
	}
	return nil
}

// StopOrphans stops the program VMs an earlier node process left running
// (programs do not survive the node), each through the backend its record
// names, and records them stopped.
// Those keep names (persistent programs to take back) are left running.
func (p *Launcher) StopOrphans(ctx context.Context, hvs execution.Hypervisors, keep map[message.ItemHash]bool) error {
	return p.opts.Records.EachLive(ctx, execution.KindProgram, func(rec execution.Record) error {
		if keep[rec.Ref] {
			return nil
		}
		hv, err := hvs.Get(rec.HypervisorName())
		if err != nil {
			return err
		}
		if vm, err := hv.Attach(ctx, rec.VMDir); err == nil {
			p.opts.Log.Info("stopping a program left running by an earlier node", "ref", rec.Ref, "hypervisor", hv.Name())
			if err := vm.Stop(ctx, nil, hypervisor.StopTimeouts{Shutdown: time.Second, Quit: 10 * time.Second, Kill: 5 * time.Second}); err != nil {
				return err
			}
		}
		if rec.VMDir != "" {
			_ = os.RemoveAll(rec.VMDir)
		}
		return p.opts.Records.SetState(ctx, rec.Ref, execution.StateStopped)
	})
}
