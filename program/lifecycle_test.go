package program

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/teststore"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
	"github.com/alephvm/alephvm/store"
)

// fakeAgent is a guest init whose workload is ready at once.
type fakeAgent struct{ state guest.State }

func (a *fakeAgent) Subscribe(ctx context.Context) (guest.Status, <-chan guest.Event) {
	return a.Status(), make(chan guest.Event)
}
func (a *fakeAgent) Status() guest.Status { return guest.Status{State: a.state} }
func (a *fakeAgent) Logs(ctx context.Context, follow bool, _ func(guest.LogLine) error) error {
	if follow {
		<-ctx.Done()
	}
	return nil
}
func (a *fakeAgent) Signal(syscall.Signal) error { return nil }
func (a *fakeAgent) Exec(context.Context, guest.ExecRequest) (guest.ExecResult, error) {
	return guest.ExecResult{}, nil
}
func (a *fakeAgent) Sysinfo() (guest.Sysinfo, error) { return guest.Sysinfo{}, nil }
func (a *fakeAgent) Halt(context.Context) error      { return nil }
func (a *fakeAgent) PowerOff()                       {}

// fakeVM is a started VM whose control channel a fakeAgent serves, or
// fails as the test asks.
type fakeVM struct {
	agent    *fakeAgent
	dialErr  error
	done     chan struct{}
	stopOnce sync.Once
	stopped  bool
	guestEnd net.Conn
}

func (v *fakeVM) Pid() int              { return 0 }
func (v *fakeVM) Done() <-chan struct{} { return v.done }
func (v *fakeVM) ConsoleLog() string    { return "/nonexistent/console.log" }
func (v *fakeVM) Close()                {}
func (v *fakeVM) DialControl(context.Context) (net.Conn, error) {
	if v.dialErr != nil {
		return nil, v.dialErr
	}
	host, g := net.Pipe()
	v.guestEnd = g
	go guest.ServeSession(context.Background(), g, g, "test", v.agent)
	return host, nil
}
func (v *fakeVM) Stop(context.Context, func(context.Context) error, hypervisor.StopTimeouts) error {
	v.stopOnce.Do(func() {
		v.stopped = true
		close(v.done)
	})
	return nil
}

// startingHypervisor starts fakeVMs, and checks that the VM's record
// exists before it does.
type startingHypervisor struct {
	records    *execution.Records
	vm         *fakeVM
	failRecord bool   // the record is not there when the VM starts
	onStart    func() // called once the VM has started
}

func (h *startingHypervisor) Name() string { return hypervisor.QEMU }
func (h *startingHypervisor) Start(ctx context.Context, spec hypervisor.Spec) (execution.VM, error) {
	if h.records != nil {
		recs, err := h.records.List(ctx, execution.KindProgram)
		if err != nil || len(recs) != 1 || recs[0].State != execution.StateStarting || recs[0].VMDir != spec.Dir {
			h.failRecord = true
		}
	}
	if h.onStart != nil {
		h.onStart()
	}
	return h.vm, nil
}
func (h *startingHypervisor) Attach(context.Context, string) (execution.VM, error) {
	return nil, errNoVM
}

// TestBootFailuresLeaveNothing: a VM that fails after its hypervisor
// started is stopped, and its network, directory and record released;
// its record was written before the hypervisor started, so that a node
// dying meanwhile leaves a VM the next node finds.
func TestBootFailuresLeaveNothing(t *testing.T) {
	for _, tc := range []struct {
		name     string
		vm       *fakeVM
		want     string
		brokenDB bool // the database fails once the VM has started
	}{
		{"no control channel", &fakeVM{dialErr: errors.New("no init")}, "control channel", false},
		{"workload failed", &fakeVM{agent: &fakeAgent{state: guest.StateFailed}}, "program did not start", false},
		{"record not written", &fakeVM{agent: &fakeAgent{state: guest.StateReady}}, "record execution", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, ref := programStore(t)
			_, db := teststore.Open(t, t.TempDir())
			records := execution.NewRecords(db)
			tc.vm.done = make(chan struct{})
			hv := &startingHypervisor{records: records, vm: tc.vm}
			if tc.brokenDB {
				hv.onStart = func() { db.Close() }
			}
			nets := &fakeNetworks{}
			run := t.TempDir()
			l := New(Options{Store: st, Hypervisor: hv, Networks: nets, Records: records, Kernel: testKernel, RunDir: run,
				VolumesDir: t.TempDir(), ReadyTimeout: 5 * time.Second, Logs: NewLogArchive(10), Log: slog.New(slog.DiscardHandler)})
			ctx := context.Background()
			plan, err := l.Plan(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := l.Boot(ctx, plan); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("boot: %v, want an error saying %q", err, tc.want)
			}
			if hv.failRecord {
				t.Error("the hypervisor started before the VM's record was written")
			}
			if !tc.vm.stopped {
				t.Error("the VM was left running")
			}
			if len(nets.detached) != 1 {
				t.Errorf("network released %d times", len(nets.detached))
			}
			if entries, _ := os.ReadDir(run); len(entries) != 0 {
				t.Errorf("runtime files left: %v", entries)
			}
			if tc.brokenDB {
				return
			}
			rec, err := records.Get(ctx, ref)
			if err != nil || rec.State != execution.StateStopped {
				t.Errorf("record %+v (%v), want stopped", rec, err)
			}
		})
	}
}

// TestClosedControlChannelDoesNotSpin: a guest that hangs up its control
// channel leaves the node waiting for the VM's end, not looping on the
// closed channel.
func TestClosedControlChannelDoesNotSpin(t *testing.T) {
	st, ref := programStore(t)
	vm := &fakeVM{agent: &fakeAgent{state: guest.StateReady}, done: make(chan struct{})}
	hv := &startingHypervisor{vm: vm}
	l := New(Options{Store: st, Hypervisor: hv, Networks: &fakeNetworks{}, Kernel: testKernel, RunDir: t.TempDir(),
		VolumesDir: t.TempDir(), ReadyTimeout: 5 * time.Second, Logs: NewLogArchive(10), Log: slog.New(slog.DiscardHandler)})
	ctx := context.Background()
	plan, err := l.Plan(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	prog, err := l.Boot(ctx, plan)
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Stop(ctx)
	client := prog.(*programVM).client
	vm.guestEnd.Close()
	<-client.Done()
	// A goroutine looping on a closed channel is never seen blocked in
	// its select; one waiting for the VM always is, once it has seen the
	// close.
	deadline := time.Now().Add(10 * time.Second)
	for !watchBlocked() {
		if time.Now().After(deadline) {
			t.Fatal("the watch of a program whose guest hung up never blocks: it spins")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-prog.Done():
		t.Fatal("the program was stopped: a closed control channel is not the VM's end")
	default:
	}
}

// watchBlocked reports whether programVM.watch's goroutine is blocked in
// its select.
func watchBlocked() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "(*programVM).watch") {
			return strings.Contains(strings.SplitN(g, "\n", 2)[0], "[select")
		}
	}
	return false
}

// countingStore counts the files fetched.
type countingStore struct {
	*store.Store
	fetches atomic.Int32
}

func (s *countingStore) Fetch(ctx context.Context, ref message.ItemHash, useLatest bool) (*store.Item, error) {
	s.fetches.Add(1)
	return s.Store.Fetch(ctx, ref, useLatest)
}

// TestNothingDownloadedBeforeAdmission: a program the node has no room
// for is refused before any of its files is fetched.
func TestNothingDownloadedBeforeAdmission(t *testing.T) {
	st, ref := programStore(t)
	counting := &countingStore{Store: st}
	l := New(Options{Store: counting, Hypervisor: &fakeHypervisor{name: hypervisor.QEMU}, Networks: &fakeNetworks{}, Kernel: testKernel,
		RunDir: t.TempDir(), VolumesDir: t.TempDir(), Logs: NewLogArchive(10), Log: slog.New(slog.DiscardHandler)})
	p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 128, VCPUs: 4}, Log: slog.New(slog.DiscardHandler)})
	if _, err := p.Acquire(context.Background(), ref); !errors.Is(err, pool.ErrInsufficientCapacity) {
		t.Fatalf("a 256 MiB program on a 128 MiB node: %v", err)
	}
	if n := counting.fetches.Load(); n != 0 {
		t.Errorf("%d files fetched for a program refused admission", n)
	}
}

// TestRequirementsRefusedBeforeAnything: a program this node cannot run
// as its message asks is refused by the pool's plan, with the reason,
// before any file is fetched or capacity taken.
func TestRequirementsRefusedBeforeAnything(t *testing.T) {
	for _, tc := range []struct {
		name   string
		edit   func(c map[string]any)
		status int
	}{
		{"another node", func(c map[string]any) {
			c["requirements"] = map[string]any{"node": map[string]any{"node_hash": strings.Repeat("cd", 32)}}
		}, 400},
		{"a GPU", func(c map[string]any) {
			c["requirements"] = map[string]any{"gpu": []any{map[string]any{"vendor": "NVIDIA", "device_name": "x", "device_class": "0300", "device_id": "10de:1234"}}}
		}, 503},
	} {
		st, ref := programStoreEdit(t, tc.edit)
		counting := &countingStore{Store: st}
		l := New(Options{Store: counting, Hypervisor: &fakeHypervisor{name: hypervisor.QEMU}, Networks: &fakeNetworks{}, Kernel: testKernel,
			RunDir: t.TempDir(), VolumesDir: t.TempDir(), Logs: NewLogArchive(10), Node: execution.Node{Hash: strings.Repeat("ab", 32)},
			Log: slog.New(slog.DiscardHandler)})
		p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 4096, VCPUs: 4}, Log: slog.New(slog.DiscardHandler)})
		_, err := p.Acquire(context.Background(), ref)
		var e *execution.Error
		if !errors.As(err, &e) || e.Status != tc.status {
			t.Errorf("%s: %v, want %d", tc.name, err, tc.status)
		}
		if n := counting.fetches.Load(); n != 0 {
			t.Errorf("%s: %d files fetched", tc.name, n)
		}
	}
}

// TestProgramDiskSpace: a program whose volumes the filesystem cannot
// hold is refused 507 before any file is fetched or network attached.
func TestProgramDiskSpace(t *testing.T) {
	st, ref := programStore(t) // an 8 MiB ephemeral volume
	counting := &countingStore{Store: st}
	nets := &fakeNetworks{}
	ledger := diskusage.NewLedger(t.TempDir(), diskusage.Space{Reserve: 4 << 20, Free: func(string) (int64, error) { return 10 << 20, nil }})
	l := New(Options{Store: counting, Hypervisor: &fakeHypervisor{name: hypervisor.QEMU}, Networks: nets, Kernel: testKernel,
		RunDir: t.TempDir(), VolumesDir: t.TempDir(), DiskSpace: ledger, Logs: NewLogArchive(10), Log: slog.New(slog.DiscardHandler)})
	p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 4096, VCPUs: 4}, Log: slog.New(slog.DiscardHandler)})
	_, err := p.Acquire(context.Background(), ref)
	var e *execution.Error
	if !errors.As(err, &e) || e.Status != 507 || !errors.Is(err, diskusage.ErrNoSpace) {
		t.Fatalf("8 MiB of volumes with 6 MiB to spare: %v, want 507", err)
	}
	if n := counting.fetches.Load(); n != 0 {
		t.Errorf("%d files fetched for a program refused for its disks", n)
	}
	// The refusal released its promise: the whole free space is there again.
	release, err := ledger.Reserve("x", 6<<20)
	if err != nil {
		t.Fatalf("the refused program holds a promise: %v", err)
	}
	release()
}
