package pool

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vms "github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/message"
)

type fakeProgram struct {
	done    chan struct{}
	once    sync.Once
	stopped atomic.Bool
	gate    chan struct{} // when set, Stop waits for it to close
}

func (f *fakeProgram) Target() *url.URL       { return &url.URL{Scheme: "http", Host: "127.0.0.1:1"} }
func (f *fakeProgram) Done() <-chan struct{}  { return f.done }
func (f *fakeProgram) Networking() Networking { return Networking{IPv4: "172.16.4.2"} }
func (f *fakeProgram) exit()                  { f.once.Do(func() { close(f.done) }) }
func (f *fakeProgram) Stop(context.Context) error {
	if f.gate != nil {
		<-f.gate
	}
	f.stopped.Store(true)
	f.exit()
	return nil
}

type fakeLauncher struct {
	mu       sync.Mutex
	revision string
	memory   int
	boots    atomic.Int32
	bootWait time.Duration
	fail     error
	progs    []*fakeProgram
	stopGate chan struct{} // given to the programs it boots
	persist  bool          // its programs are persistent
	planErr  error         // Plan fails with it
	planWait time.Duration // Plan takes that long
}

func (l *fakeLauncher) Plan(_ context.Context, ref message.ItemHash) (*Plan, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	time.Sleep(l.planWait)
	if l.planErr != nil {
		return nil, l.planErr
	}
	return &Plan{Ref: ref, Revision: l.revision, VCPUs: 1, MemoryMiB: l.memory, Timeout: time.Second, Persistent: l.persist}, nil
}

func (l *fakeLauncher) Boot(_ context.Context, _ *Plan) (Program, error) {
	l.boots.Add(1)
	time.Sleep(l.bootWait)
	if l.fail != nil {
		return nil, l.fail
	}
	l.mu.Lock()
	p := &fakeProgram{done: make(chan struct{}), gate: l.stopGate}
	l.progs = append(l.progs, p)
	l.mu.Unlock()
	return p, nil
}

func (l *fakeLauncher) last() *fakeProgram {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.progs[len(l.progs)-1]
}

const ref = message.ItemHash("7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003")

func newPool(l *fakeLauncher, reuse time.Duration) *Pool {
	return New(Options{Launcher: l, Capacity: Capacity{MemoryMiB: 1024, VCPUs: 8}, ReuseTimeout: reuse,
		PlanTTL: time.Nanosecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestConcurrentFirstRequestsShareOneBoot(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128, bootWait: 100 * time.Millisecond}
	p := newPool(l, time.Hour)
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lease, err := p.Acquire(context.Background(), ref)
			if err != nil {
				t.Error(err)
				return
			}
			lease.Release()
		}()
	}
	wg.Wait()
	if n := l.boots.Load(); n != 1 {
		t.Errorf("%d boots, want 1", n)
	}
	if list := p.List(); len(list) != 1 || !list[0].Running || list[0].Inflight != 0 {
		t.Errorf("list %+v", list)
	}
}

func TestIdleProgramStops(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newPool(l, 50*time.Millisecond)
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if l.last().stopped.Load() {
		t.Fatal("stopped while a request was in flight")
	}
	lease.Release()
	eventually(t, "idle stop", func() bool { return l.last().stopped.Load() && len(p.List()) == 0 })

	// Reuse timeout 0: stopped as soon as the last request ends.
	p = newPool(l, 0)
	lease, _ = p.Acquire(context.Background(), ref)
	lease.Release()
	eventually(t, "stop after request", func() bool { return l.last().stopped.Load() })
}

func TestChangedItemsRestartTheProgram(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newPool(l, time.Hour)
	lease, _ := p.Acquire(context.Background(), ref)
	first := l.last()
	lease.Release()
	l.mu.Lock()
	l.revision = "r2"
	l.mu.Unlock()
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	lease.Release()
	if l.boots.Load() != 2 || lease.Plan().Revision != "r2" {
		t.Errorf("boots %d revision %s", l.boots.Load(), lease.Plan().Revision)
	}
	eventually(t, "old VM stopped", first.stopped.Load)
}

func TestAdmissionControl(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 2048}
	p := newPool(l, time.Hour)
	if _, err := p.Acquire(context.Background(), ref); !errors.Is(err, ErrInsufficientCapacity) {
		t.Errorf("err = %v", err)
	}
	if l.boots.Load() != 0 {
		t.Error("booted beyond capacity")
	}
}

func TestFailedBootAndDeadVM(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128, fail: errors.New("no kernel")}
	p := newPool(l, time.Hour)
	if _, err := p.Acquire(context.Background(), ref); err == nil || err.Error() != "no kernel" {
		t.Fatalf("err = %v", err)
	}
	if len(p.List()) != 0 {
		t.Error("failed boot kept in the pool")
	}
	l.fail = nil
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	lease.Release()
	l.last().exit() // the VM dies by itself
	eventually(t, "dead VM forgotten", func() bool { return len(p.List()) == 0 })
	lease, err = p.Acquire(context.Background(), ref)
	if err != nil || l.boots.Load() != 3 {
		t.Fatalf("err %v boots %d", err, l.boots.Load())
	}
	lease.Release()
}

func TestShutdownWaitsForRequests(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newPool(l, time.Hour)
	lease, _ := p.Acquire(context.Background(), ref)
	done := make(chan error)
	go func() { done <- p.Shutdown(context.Background()) }()
	time.Sleep(50 * time.Millisecond)
	if l.last().stopped.Load() {
		t.Fatal("stopped under a request")
	}
	if _, err := p.Acquire(context.Background(), ref); !errors.Is(err, ErrDraining) {
		t.Errorf("acquire while draining: %v", err)
	}
	lease.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !l.last().stopped.Load() {
		t.Error("not stopped")
	}
}

// countingLauncher counts Plan calls and makes each last a while.
type countingLauncher struct {
	fakeLauncher
	plans atomic.Int32
}

func (l *countingLauncher) Plan(ctx context.Context, ref message.ItemHash) (*Plan, error) {
	l.plans.Add(1)
	time.Sleep(50 * time.Millisecond)
	return l.fakeLauncher.Plan(ctx, ref)
}

func TestStalePlanIsResolvedOnce(t *testing.T) {
	l := &countingLauncher{fakeLauncher: fakeLauncher{revision: "r1", memory: 128}}
	p := New(Options{Launcher: l, Capacity: Capacity{MemoryMiB: 1024, VCPUs: 8}, ReuseTimeout: time.Hour,
		PlanTTL: time.Hour, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lease, err := p.Acquire(context.Background(), ref)
			if err != nil {
				t.Error(err)
				return
			}
			lease.Release()
		}()
	}
	wg.Wait()
	if n := l.plans.Load(); n != 1 {
		t.Errorf("%d Plan calls for 20 concurrent requests, want 1", n)
	}
}

func TestStopWait(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newPool(l, time.Hour)
	if was, err := p.StopWait(context.Background(), ref); was || err != nil {
		t.Fatalf("not running: %v %v", was, err)
	}
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	// It waits for the request in flight, then for the VM to be gone.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if was, err := p.StopWait(ctx, ref); !was || err == nil {
		t.Fatalf("stop with a request in flight: %v %v", was, err)
	}
	lease.Release()
	eventually(t, "stop", func() bool { return l.last().stopped.Load() })

	lease, _ = p.Acquire(context.Background(), ref)
	lease.Release()
	if was, err := p.StopWait(context.Background(), ref); !was || err != nil || !l.last().stopped.Load() {
		t.Fatalf("stop: %v %v", was, err)
	}
}

// TestRestartWaitsForThePreviousVM: a ref asked for while its previous VM
// is still stopping boots once that VM is gone, so that the two never
// share a network or a directory; the stopping VM's memory counts until
// then.
func TestRestartWaitsForThePreviousVM(t *testing.T) {
	l := &fakeLauncher{revision: "a", memory: 400}
	p := newPool(l, time.Hour)
	ctx := context.Background()
	lease, err := p.Acquire(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	lease.Release()
	gate := make(chan struct{})
	l.last().gate = gate
	if !p.Stop(ref) {
		t.Fatal("not running")
	}
	if used := p.opts.Admission.Used(); used.MemoryMiB != 400 {
		t.Fatalf("a stopping VM holds %d MiB, want 400", used.MemoryMiB)
	}
	acquired := make(chan error, 1)
	go func() {
		lease, err := p.Acquire(ctx, ref)
		if err == nil {
			lease.Release()
		}
		acquired <- err
	}()
	time.Sleep(200 * time.Millisecond)
	if n := l.boots.Load(); n != 1 {
		t.Fatalf("%d boots while the previous VM was stopping, want 1", n)
	}
	close(gate)
	if err := <-acquired; err != nil {
		t.Fatal(err)
	}
	if n := l.boots.Load(); n != 2 {
		t.Fatalf("%d boots, want 2", n)
	}
	if used := p.opts.Admission.Used(); used.MemoryMiB != 400 {
		t.Fatalf("%d MiB held with one VM running, want 400", used.MemoryMiB)
	}
}

// TestAdmissionCountsOtherVMs: programs are admitted into the capacity the
// node's instances share.
func TestAdmissionCountsOtherVMs(t *testing.T) {
	l := &fakeLauncher{revision: "a", memory: 512}
	adm := vms.NewAdmission(Capacity{MemoryMiB: 1024, VCPUs: 8})
	p := New(Options{Launcher: l, Admission: adm, ReuseTimeout: time.Hour, PlanTTL: time.Nanosecond, Log: slog.New(slog.DiscardHandler)})
	instance, err := adm.Admit("instance", Capacity{MemoryMiB: 768, VCPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Acquire(context.Background(), ref); !errors.Is(err, ErrInsufficientCapacity) {
		t.Fatalf("with an instance holding 768 MiB of 1024: %v, want %v", err, ErrInsufficientCapacity)
	}
	instance()
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	lease.Release()
	if _, err := adm.Admit("instance", Capacity{MemoryMiB: 768, VCPUs: 2}); !errors.Is(err, ErrInsufficientCapacity) {
		t.Fatalf("an instance past a running program: %v", err)
	}
}

// TestWarmProgramsDoNotWaitForTheCoreNode: once a program runs, a check of
// its message that fails (the core node is down) or hangs leaves it
// answering as it was.
func TestWarmProgramsDoNotWaitForTheCoreNode(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newPool(l, time.Minute)
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	lease.Release()
	l.mu.Lock()
	l.planErr = errors.New("core node down")
	l.mu.Unlock()
	for range 3 {
		lease, err := p.Acquire(context.Background(), ref)
		if err != nil {
			t.Fatalf("a warm program with the core node down: %v", err)
		}
		lease.Release()
	}
	l.mu.Lock()
	l.planErr, l.planWait = nil, 5*time.Second
	l.mu.Unlock()
	time.Sleep(time.Millisecond)
	start := time.Now()
	lease, err = p.Acquire(context.Background(), ref)
	if err != nil || time.Since(start) > 3*time.Second {
		t.Fatalf("a warm program with a hanging core node: %v after %s", err, time.Since(start))
	}
	lease.Release()
	if l.boots.Load() != 1 {
		t.Errorf("%d boots", l.boots.Load())
	}
	// A program never seen is not run blind.
	l.mu.Lock()
	l.planErr, l.planWait = errors.New("core node down"), 0
	l.mu.Unlock()
	if _, err := p.Acquire(context.Background(), message.ItemHash(strings.Repeat("ab", 32))); err == nil {
		t.Error("a program never planned ran with the core node down")
	}
}

// newHotPool is newPool with plans trusted for planTTL: requests lease the
// running program without the pool's lock (acquireHot) while it lasts.
func newHotPool(l *fakeLauncher, reuse, planTTL time.Duration) *Pool {
	return New(Options{Launcher: l, Capacity: Capacity{MemoryMiB: 1024, VCPUs: 8}, ReuseTimeout: reuse,
		PlanTTL: planTTL, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
}

func TestHotLeasesKeepTheProgramWarm(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newHotPool(l, 250*time.Millisecond, time.Hour)
	// Requests every 10 ms for 4 reuse timeouts: the program runs on,
	// though no request is in flight when its timer fires.
	var idle time.Time
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		lease, err := p.Acquire(context.Background(), ref)
		if err != nil {
			t.Fatal(err)
		}
		if _, hot := p.hot.Load(ref); !hot {
			t.Fatal("a warm program is not leased without the lock")
		}
		if list := p.List(); len(list) != 1 || list[0].Inflight != 1 {
			t.Fatalf("list %+v", list)
		}
		lease.Release()
		idle = time.Now()
		lease.Release() // a second release changes nothing
	}
	if l.boots.Load() != 1 || l.last().stopped.Load() {
		t.Fatalf("boots %d, stopped %v: stopped while in use", l.boots.Load(), l.last().stopped.Load())
	}
	// Then idle: stopped after the reuse timeout, and out of hot.
	eventually(t, "idle stop", func() bool { return l.last().stopped.Load() && len(p.List()) == 0 })
	if d := time.Since(idle); d < 250*time.Millisecond {
		t.Errorf("stopped %v after its last request, before the reuse timeout", d)
	}
	if _, hot := p.hot.Load(ref); hot {
		t.Error("a stopped program is still leased without the lock")
	}
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil || l.boots.Load() != 2 {
		t.Fatalf("err %v, boots %d", err, l.boots.Load())
	}
	lease.Release()
}

func TestHotLeasesNoticeChangedItems(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newHotPool(l, time.Hour, 50*time.Millisecond)
	lease, _ := p.Acquire(context.Background(), ref)
	lease.Release()
	l.mu.Lock()
	l.revision = "r2"
	l.mu.Unlock()
	eventually(t, "the new revision", func() bool {
		lease, err := p.Acquire(context.Background(), ref)
		if err != nil {
			t.Fatal(err)
		}
		lease.Release()
		return lease.Plan().Revision == "r2"
	})
	if l.boots.Load() != 2 {
		t.Errorf("%d boots, want 2", l.boots.Load())
	}
}

// A program stopped while requests lease it without the lock: no request
// holds a lease on a VM that has been stopped, and none fails.
func TestHotLeasesRaceStops(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newHotPool(l, time.Hour, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var leases atomic.Int64
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				lease, err := p.Acquire(context.Background(), ref)
				if err != nil {
					t.Error(err)
					return
				}
				if lease.Program().(*fakeProgram).stopped.Load() {
					t.Error("leased a stopped VM")
				}
				leases.Add(1)
				time.Sleep(time.Duration(leases.Load()%3) * 50 * time.Microsecond)
				if lease.Program().(*fakeProgram).stopped.Load() {
					t.Error("VM stopped under a lease")
				}
				lease.Release()
			}
		}()
	}
	// Stops until 10 of them met leases (however slow the machine is).
	stops := 0
	for end := time.Now().Add(30 * time.Second); stops < 10 || leases.Load() < 100; time.Sleep(2 * time.Millisecond) {
		if time.Now().After(end) {
			t.Errorf("%d stops, %d leases in 30 s: the race was not run", stops, leases.Load())
			break
		}
		if p.Stop(ref) {
			stops++
		}
	}
	cancel()
	wg.Wait()
	if t.Failed() {
		return
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A request that found the program in hot just before a stop took it out
// must not lease it: the stop may have found it idle already.
func TestHotLeaseOfAStoppingVM(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newHotPool(l, time.Hour, time.Hour)
	lease, _ := p.Acquire(context.Background(), ref)
	lease.Release()
	found, ok := p.hot.Load(ref)
	if !ok {
		t.Fatal("a warm program is not leased without the lock")
	}
	p.Stop(ref)
	p.hot.Store(ref, found) // what the request read before the stop
	if lease := p.acquireHot(ref); lease != nil {
		t.Fatal("leased a stopping VM")
	}
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	defer lease.Release()
	if l.boots.Load() != 2 || lease.Program() == found.(*hotLease).e.prog {
		t.Errorf("boots %d: not a new VM", l.boots.Load())
	}
}

// Once the pool drains, a program that was leased without the lock is
// not leased any more: new requests are refused as on the locked way.
func TestHotLeasesEndWhenDraining(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newHotPool(l, time.Hour, time.Hour)
	lease, _ := p.Acquire(context.Background(), ref)
	done := make(chan error)
	go func() { done <- p.Shutdown(context.Background()) }()
	eventually(t, "draining", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.draining
	})
	if _, err := p.Acquire(context.Background(), ref); !errors.Is(err, ErrDraining) {
		t.Errorf("acquire while draining: %v", err)
	}
	if l.last().stopped.Load() {
		t.Fatal("stopped under a request")
	}
	lease.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A VM found unresponsive is stopped at once, under a request that cannot
// end well, and the next request boots another.
func TestUnresponsiveVMStopsAtOnce(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newPool(l, time.Hour)
	lease, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	dead := l.last()
	if p.Unresponsive(&fakeProgram{}, "not ours") {
		t.Error("a program the pool does not run was stopped")
	}
	if !p.Unresponsive(dead, "silent") {
		t.Fatal("the running program was not stopped")
	}
	eventually(t, "the VM stopped under its request", dead.stopped.Load)
	next, err := p.Acquire(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if l.boots.Load() != 2 || l.last() == dead {
		t.Errorf("%d boots: the next request did not boot another VM", l.boots.Load())
	}
	if p.Unresponsive(dead, "again") {
		t.Error("a stopped VM was stopped again")
	}
	lease.Release()
	next.Release()
}
