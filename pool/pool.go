// Package pool owns the node's running program VMs: it boots a program on
// its first request (concurrent first requests share one boot), keeps it
// warm while requests come, stops it after the reuse timeout, restarts it
// when its items change, and refuses work the node has no room for.
package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"

	vms "github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/message"
)

// Plan is what the pool must know of a program before booting it.
type Plan struct {
	Ref message.ItemHash
	// Revision identifies the resolved items (code, runtime, data, volumes
	// after use_latest): a running program whose revision differs from the
	// latest plan's is restarted.
	Revision  string
	VCPUs     int
	MemoryMiB int
	// Timeout bounds how long the program may take to answer a request
	// (resources.seconds).
	Timeout time.Duration
	CodeRef message.ItemHash
	// Message is the program's message, which Plan read and Boot runs.
	Message *message.Message
	// Persistent programs (on.persistent) run without requests: they are
	// never stopped for being idle (see SetPersistent).
	Persistent bool
}

// Program is a booted program VM.
type Program interface {
	// Target is where the program serves HTTP.
	Target() *url.URL
	// Done is closed when the VM has stopped, for whatever reason.
	Done() <-chan struct{}
	// Stop stops the VM and releases everything it held.
	Stop(ctx context.Context) error
	// Networking describes the VM's addresses, for the executions list.
	Networking() Networking
}

// Networking is a VM's network as the executions list shows it.
type Networking struct {
	IPv4Network string `json:"ipv4_network,omitempty"`
	HostIPv4    string `json:"host_ipv4,omitempty"`
	IPv4        string `json:"ipv4_ip,omitempty"`
	IPv6Network string `json:"ipv6_network,omitempty"`
	IPv6        string `json:"ipv6_ip,omitempty"`
	Tap         string `json:"tap,omitempty"`
}

// Launcher resolves and boots programs.
type Launcher interface {
	// Plan resolves a program's message and items; it is called on every
	// request (the pool caches it briefly), so it must be cheap when nothing
	// changed.
	Plan(ctx context.Context, ref message.ItemHash) (*Plan, error)
	// Boot starts the program and returns once it serves HTTP.
	Boot(ctx context.Context, plan *Plan) (Program, error)
}

// Capacity is what the node may give to VMs.
type Capacity = vms.Capacity

// Options configure a pool.
type Options struct {
	Launcher Launcher
	// Admission accounts the node's VMs, programs and instances alike;
	// nil makes one of Capacity for the pool alone.
	Admission *vms.Admission
	Capacity  Capacity
	// ReuseTimeout is how long a program stays warm after its last request;
	// 0 stops it when its last request ends.
	ReuseTimeout time.Duration
	// PlanTTL is how long a resolved plan is trusted before Plan is asked
	// again; it bounds how late an amend is noticed.
	PlanTTL time.Duration
	// BootTimeout bounds one boot.
	BootTimeout time.Duration
	// StopTimeout bounds one stop.
	StopTimeout time.Duration
	Log         *slog.Logger
}

// ErrInsufficientCapacity is returned when booting a program would
// overcommit the node's memory or vCPUs.
var ErrInsufficientCapacity = vms.ErrInsufficientCapacity

// ErrDraining is returned once the pool is shutting down.
var ErrDraining = errors.New("the node is shutting down")

// Pool holds the running programs.
type Pool struct {
	opts Options
	log  *slog.Logger

	mu       sync.Mutex
	execs    map[message.ItemHash]*execution
	leaving  map[message.ItemHash]*execution // VMs stopping, until they are gone
	plans    map[message.ItemHash]cachedPlan
	planning singleflight.Group
	draining bool
	stopping sync.WaitGroup // stops in progress
	// keepers run the persistent programs, by ref (persistent.go).
	keepers map[message.ItemHash]context.CancelFunc

	// hot holds, by ref, the running programs that Acquire may lease
	// without the pool's lock (*hotLease): a request to a warm program
	// takes no lock at all, where the lock, taken three times by every
	// request, was the proxy's most contended one.
	hot sync.Map
	// epoch is what execution.idleSince counts from (monotonic).
	epoch time.Time
}

// hotLease is a running program that Acquire may lease without the lock,
// until the plan it runs must be checked again.
type hotLease struct {
	e     *execution
	until time.Time
}

type cachedPlan struct {
	plan    *Plan
	fetched time.Time
}

type state int

const (
	booting state = iota
	running
	stopping
)

// execution is one program VM's life in the pool.
type execution struct {
	plan  *Plan
	state state
	// open is state == running (both set by setStateLocked), for
	// Acquire's lock-free path: it is cleared (under the lock) before a
	// stop looks at inflight, and that path counts itself in inflight
	// before it looks at open, so either the stop waits for its request
	// or the request leases another VM.
	open     atomic.Bool
	ready    chan struct{} // closed when the boot ends, well or not
	err      error         // why the boot failed
	prog     Program
	inflight atomic.Int64
	// unresponsive is set when its VM is stopped for not answering: the
	// stop does not wait for its requests.
	unresponsive atomic.Bool
	// idleSince is when inflight last fell to 0, in nanoseconds since the
	// pool's epoch; armed tells that the reuse timer (under the lock) is
	// set: a request that ends then leaves the timer to look at idleSince.
	idleSince atomic.Int64
	armed     atomic.Bool
	timer     *time.Timer
	since     time.Time
	release   func()        // frees its admission
	after     chan struct{} // the end of the ref's previous VM, which the boot waits for
	gone      chan struct{} // closed once its VM is stopped and released
}

// New returns an empty pool.
func New(opts Options) *Pool {
	if opts.PlanTTL == 0 {
		opts.PlanTTL = 2 * time.Second
	}
	if opts.BootTimeout == 0 {
		opts.BootTimeout = 2 * time.Minute
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = time.Minute
	}
	if opts.Admission == nil {
		opts.Admission = vms.NewAdmission(opts.Capacity)
	}
	return &Pool{opts: opts, log: opts.Log, execs: map[message.ItemHash]*execution{}, epoch: time.Now(),
		leaving: map[message.ItemHash]*execution{}, plans: map[message.ItemHash]cachedPlan{}, keepers: map[message.ItemHash]context.CancelFunc{}}
}

// Lease is the use of a running program by one request. Release it when
// the request ends.
type Lease struct {
	pool     *Pool
	exec     *execution
	released atomic.Bool
}

// Plan returns the plan the program was booted with.
func (l *Lease) Plan() *Plan { return l.exec.plan }

// Program returns the running program.
func (l *Lease) Program() Program { return l.exec.prog }

// Release ends the lease; the last one to end starts the reuse timer.
func (l *Lease) Release() {
	if l.released.CompareAndSwap(false, true) {
		l.pool.release(l.exec)
	}
}

// plan returns the program's plan, from the cache while it is fresh.
// Checking a known program again (its amends, use_latest items) stays off
// the request's path: a check that fails leaves the plan as it was (the
// core node may be down: warm programs keep answering), and one that takes
// longer than planWait answers with the plan known while it goes on.
func (p *Pool) plan(ctx context.Context, ref message.ItemHash) (*Plan, error) {
	p.mu.Lock()
	c, known := p.plans[ref]
	p.mu.Unlock()
	if known && time.Since(c.fetched) < p.opts.PlanTTL {
		return c.plan, nil
	}
	// Requests that find the plan stale together share one Plan call; it
	// runs to its end even if the request that started it goes away.
	ch := p.planning.DoChan(string(ref), func() (any, error) {
		plan, err := p.opts.Launcher.Plan(context.WithoutCancel(ctx), ref)
		p.mu.Lock()
		defer p.mu.Unlock()
		if err != nil {
			if old, ok := p.plans[ref]; ok {
				p.log.Warn("check of a program failed; it runs as it was", "ref", ref, "err", err)
				p.plans[ref] = cachedPlan{plan: old.plan, fetched: time.Now()}
			}
			return nil, err
		}
		p.plans[ref] = cachedPlan{plan: plan, fetched: time.Now()}
		return plan, nil
	})
	var late <-chan time.Time
	if known {
		late = time.After(planWait)
	}
	select {
	case res := <-ch:
		if res.Err != nil {
			if known {
				return c.plan, nil
			}
			return nil, res.Err
		}
		return res.Val.(*Plan), nil
	case <-late:
		return c.plan, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// planWait is how long a request waits for the check of a known program
// before it is served as the program was.
const planWait = time.Second

// Acquire returns a lease on the running program ref, booting it first if
// needed. Concurrent callers share one boot.
func (p *Pool) Acquire(ctx context.Context, ref message.ItemHash) (*Lease, error) {
	if l := p.acquireHot(ref); l != nil {
		return l, nil
	}
	plan, err := p.plan(ctx, ref)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	if p.draining {
		p.mu.Unlock()
		return nil, ErrDraining
	}
	e := p.execs[ref]
	if e != nil && e.state == running && e.plan.Revision != plan.Revision {
		p.log.Info("program items changed, restarting", "ref", ref, "from", e.plan.Revision, "to", plan.Revision)
		p.stopLocked(e, "items changed")
		e = nil
	}
	if e == nil {
		release, err := p.opts.Admission.Admit("program "+string(ref), Capacity{MemoryMiB: plan.MemoryMiB, VCPUs: plan.VCPUs})
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		e = &execution{plan: plan, state: booting, ready: make(chan struct{}), since: time.Now(), release: release, gone: make(chan struct{})}
		// A VM of this ref still stopping keeps its network and
		// directory until it is gone: the new one boots after that.
		if prev := p.leaving[ref]; prev != nil {
			e.after = prev.gone
		}
		p.execs[ref] = e
		go p.boot(e)
	}
	e.inflight.Add(1)
	p.mu.Unlock()

	select {
	case <-e.ready:
	case <-ctx.Done():
		p.release(e)
		return nil, ctx.Err()
	}
	if e.err != nil {
		p.release(e)
		return nil, e.err
	}
	p.publish(e, plan)
	return &Lease{pool: p, exec: e}, nil
}

// AcquireHot leases ref if it runs warm (see Acquire), with no lock and
// no wait; nil when it does not.
func (p *Pool) AcquireHot(ref message.ItemHash) *Lease { return p.acquireHot(ref) }

// acquireHot leases the running program ref without the pool's lock, when
// it is in hot and its plan is fresh; nil when the lock's way must be
// taken.
func (p *Pool) acquireHot(ref message.ItemHash) *Lease {
	v, ok := p.hot.Load(ref)
	if !ok {
		return nil
	}
	h := v.(*hotLease)
	if !time.Now().Before(h.until) {
		return nil
	}
	h.e.inflight.Add(1)
	if !h.e.open.Load() {
		p.release(h.e) // it is stopping: the lock's way finds or boots another
		return nil
	}
	return &Lease{pool: p, exec: h.e}
}

// publish puts e, leased by Acquire with the fresh plan, in hot (or moves
// its end) when e runs that plan's revision.
func (p *Pool) publish(e *execution, plan *Plan) {
	ref := e.plan.Ref
	if v, ok := p.hot.Load(ref); ok && v.(*hotLease).e == e && time.Until(v.(*hotLease).until) > p.opts.PlanTTL/2 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.plans[ref]
	if p.draining || !ok || c.plan != plan || plan.Revision != e.plan.Revision || !e.open.Load() || p.execs[ref] != e {
		return
	}
	p.hot.Store(ref, &hotLease{e: e, until: c.fetched.Add(p.opts.PlanTTL)})
}

// setStateLocked moves e to s, keeping open in step; a VM that stops
// leaves hot.
func (p *Pool) setStateLocked(e *execution, s state) {
	e.state = s
	e.open.Store(s == running)
	if s != running {
		if v, ok := p.hot.Load(e.plan.Ref); ok && v.(*hotLease).e == e {
			p.hot.Delete(e.plan.Ref)
		}
	}
}

// sinceEpoch is now, for idleSince.
func (p *Pool) sinceEpoch() int64 { return int64(time.Since(p.epoch)) }

// bootAfter boots e's VM once the ref's previous VM, if any, is gone.
func (p *Pool) bootAfter(ctx context.Context, e *execution) (Program, error) {
	if e.after != nil {
		select {
		case <-e.after:
		case <-ctx.Done():
			return nil, fmt.Errorf("program %s: its previous VM is still stopping: %w", e.plan.Ref, ctx.Err())
		}
	}
	return p.opts.Launcher.Boot(ctx, e.plan)
}

func (p *Pool) boot(e *execution) {
	// The boot is shared by every waiting request: none of them may cancel it.
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.BootTimeout)
	defer cancel()
	started := time.Now()
	prog, err := p.bootAfter(ctx, e)
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		p.log.Error("program boot failed", "ref", e.plan.Ref, "err", err)
		e.err = err
		if p.execs[e.plan.Ref] == e {
			delete(p.execs, e.plan.Ref)
		}
		e.release()
		close(e.gone)
		close(e.ready)
		return
	}
	p.log.Info("program booted", "ref", e.plan.Ref, "took", time.Since(started).Round(time.Millisecond))
	e.prog, e.since = prog, time.Now()
	p.setStateLocked(e, running)
	close(e.ready)
	if e.inflight.Load() == 0 {
		e.idleSince.Store(p.sinceEpoch())
		p.armLocked(e)
	}
	go p.watch(e)
}

// watch forgets a program whose VM stopped by itself, so that the next
// request boots it again.
func (p *Pool) watch(e *execution) {
	<-e.prog.Done()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.execs[e.plan.Ref] == e {
		p.log.Warn("program VM stopped on its own", "ref", e.plan.Ref)
		p.stopLocked(e, "vm exited")
	}
}

func (p *Pool) release(e *execution) {
	if e.inflight.Add(-1) > 0 {
		return
	}
	e.idleSince.Store(p.sinceEpoch())
	if e.armed.Load() {
		return // the timer looks at idleSince when it fires
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if e.inflight.Load() == 0 && e.state == running && !e.armed.Load() {
		p.armLocked(e)
	}
}

// armLocked starts the reuse timer of an idle program; a persistent one
// that the allocation keeps runs on (one used on request only is stopped
// when idle, as any program).
func (p *Pool) armLocked(e *execution) {
	if _, kept := p.keepers[e.plan.Ref]; kept && e.plan.Persistent {
		return
	}
	if p.opts.ReuseTimeout <= 0 {
		p.stopLocked(e, "reuse timeout is 0")
		return
	}
	p.armAfterLocked(e, p.opts.ReuseTimeout)
}

// armAfterLocked sets e's reuse timer to fire after d. When it fires, a
// program idle for the reuse timeout is stopped; one idle for less is
// looked at again when it would be; one serving a request is left to
// that request's release, which arms the timer again.
func (p *Pool) armAfterLocked(e *execution, d time.Duration) {
	e.armed.Store(true)
	e.timer = time.AfterFunc(d, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		// armed is cleared before inflight is read: a release that finds
		// it set has already lowered inflight, which is read here.
		e.armed.Store(false)
		if e.state != running || p.execs[e.plan.Ref] != e || e.inflight.Load() != 0 {
			return
		}
		idle := time.Duration(p.sinceEpoch() - e.idleSince.Load())
		if idle >= p.opts.ReuseTimeout {
			p.stopLocked(e, "idle")
			return
		}
		p.armAfterLocked(e, p.opts.ReuseTimeout-idle)
	})
}

// stopLocked removes e from the pool and stops its VM once its in-flight
// requests are done.
func (p *Pool) stopLocked(e *execution, why string) {
	if e.state == stopping {
		return
	}
	p.setStateLocked(e, stopping)
	if e.timer != nil {
		e.timer.Stop()
	}
	if p.execs[e.plan.Ref] == e {
		delete(p.execs, e.plan.Ref)
	}
	p.leaving[e.plan.Ref] = e
	p.stopping.Add(1)
	go func() {
		defer p.stopping.Done()
		defer func() {
			// Stop has released what the VM held, even when it failed.
			e.release()
			p.mu.Lock()
			if p.leaving[e.plan.Ref] == e {
				delete(p.leaving, e.plan.Ref)
			}
			p.mu.Unlock()
			close(e.gone)
		}()
		p.waitIdle(e)
		ctx, cancel := context.WithTimeout(context.Background(), p.opts.StopTimeout)
		defer cancel()
		if err := e.prog.Stop(ctx); err != nil {
			p.log.Error("stop program", "ref", e.plan.Ref, "err", err)
			return
		}
		p.log.Info("program stopped", "ref", e.plan.Ref, "why", why)
	}()
}

// waitIdle waits until e serves no request, or its VM is gone, or it is
// unresponsive (its requests cannot end well).
func (p *Pool) waitIdle(e *execution) {
	for {
		if e.inflight.Load() == 0 || e.unresponsive.Load() {
			return
		}
		select {
		case <-e.prog.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Unresponsive stops the running program whose VM is prog, at once,
// without waiting for its requests: its network has stopped answering
// (the proxy found it silent; see api's upstreams), so they cannot end
// well, and the next request boots it again. It reports whether prog was
// running.
func (p *Pool) Unresponsive(prog Program, why string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.execs {
		if e.prog == prog && e.state == running {
			p.log.Warn("program VM unresponsive: stopping it", "ref", e.plan.Ref, "why", why)
			e.unresponsive.Store(true)
			p.stopLocked(e, "unresponsive")
			return true
		}
	}
	return false
}

// Stop stops the program ref. It reports whether it was running.
func (p *Pool) Stop(ref message.ItemHash) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.unkeepLocked(ref)
	e := p.execs[ref]
	if e == nil || e.state != running {
		return false
	}
	p.stopLocked(e, "asked")
	return true
}

// StopWait stops the program ref as Stop does and waits until its VM is
// gone and has released what it held, so that it can be booted again over
// the same volumes. It reports whether it was running.
func (p *Pool) StopWait(ctx context.Context, ref message.ItemHash) (bool, error) {
	p.mu.Lock()
	p.unkeepLocked(ref)
	e := p.execs[ref]
	if e == nil || e.state != running {
		p.mu.Unlock()
		return false, nil
	}
	p.stopLocked(e, "asked")
	p.mu.Unlock()
	select {
	case <-e.prog.Done():
		return true, nil
	case <-ctx.Done():
		return true, fmt.Errorf("stop program %s: %w", ref, ctx.Err())
	}
}

// Shutdown refuses new programs, lets in-flight requests finish and stops
// every program VM, or gives up when ctx ends.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.draining = true
	p.detachKeptLocked()
	for ref, stop := range p.keepers {
		stop()
		delete(p.keepers, ref)
	}
	var booting []*execution
	for _, e := range p.execs {
		if e.state == running {
			p.stopLocked(e, "node shutdown")
		} else {
			booting = append(booting, e)
		}
	}
	p.mu.Unlock()
	for _, e := range booting {
		select {
		case <-e.ready:
		case <-ctx.Done():
			return ctx.Err()
		}
		p.mu.Lock()
		if e.err == nil {
			p.stopLocked(e, "node shutdown")
		}
		p.mu.Unlock()
	}
	done := make(chan struct{})
	go func() { p.stopping.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop programs: %w", ctx.Err())
	}
}

// ExecutionInfo describes one program in the pool.
type ExecutionInfo struct {
	Ref        message.ItemHash
	Running    bool
	Since      time.Time
	VCPUs      int
	MemoryMiB  int
	Inflight   int
	Networking Networking
	// Plan is what the program was booted with; Program the running
	// program, nil while it boots.
	Plan    *Plan
	Program Program
}

// List describes the programs in the pool, by ref.
func (p *Pool) List() []ExecutionInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]ExecutionInfo, 0, len(p.execs))
	for ref, e := range p.execs {
		info := ExecutionInfo{Ref: ref, Running: e.state == running, Since: e.since,
			VCPUs: e.plan.VCPUs, MemoryMiB: e.plan.MemoryMiB, Inflight: int(e.inflight.Load()), Plan: e.plan, Program: e.prog}
		if e.prog != nil {
			info.Networking = e.prog.Networking()
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out
}
