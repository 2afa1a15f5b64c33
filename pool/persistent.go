package pool

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/alephvm/alephvm/message"
)

// Persistent programs (on.persistent, listed in the scheduler's
// persistent_vms) run without requests: a keeper boots each, boots it
// again when its VM ends (1 s, doubling to a minute between tries while it
// keeps failing) and stops it when the scheduler drops it.

// ErrNotPersistent is what SetPersistent answers for a program whose
// message does not ask to be persistent.
var ErrNotPersistent = errors.New("not a persistent program (on.persistent is not true)")

// Backoff bounds of a persistent program's restarts.
const (
	persistentFirstRetry = time.Second
	persistentMaxRetry   = time.Minute
	// persistentStable is how long a VM must run for its next failure to
	// be retried quickly again.
	persistentStable = time.Minute
)

// SetPersistent makes refs the persistent programs the node runs: those
// not running yet get a keeper, those no longer listed are stopped. A ref
// that cannot be one (its message is missing, not a PROGRAM, or not
// persistent) is refused, in errs, and not kept.
func (p *Pool) SetPersistent(ctx context.Context, refs []message.ItemHash) (errs map[message.ItemHash]error) {
	errs = map[message.ItemHash]error{}
	want := map[message.ItemHash]bool{}
	for _, ref := range refs {
		plan, err := p.plan(ctx, ref)
		if err == nil && !plan.Persistent {
			err = fmt.Errorf("program %s: %w", ref, ErrNotPersistent)
		}
		if err != nil {
			errs[ref] = err
			continue
		}
		want[ref] = true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.draining {
		for ref := range want {
			errs[ref] = ErrDraining
		}
		return errs
	}
	for ref, stop := range p.keepers {
		if !want[ref] {
			stop()
			delete(p.keepers, ref)
			if e := p.execs[ref]; e != nil && e.state == running {
				p.stopLocked(e, "dropped from the allocation")
			}
			p.log.Info("persistent program dropped", "ref", ref)
		}
	}
	for ref := range want {
		if _, ok := p.keepers[ref]; !ok {
			kctx, stop := context.WithCancel(context.Background())
			p.keepers[ref] = stop
			go p.keep(kctx, ref)
		}
	}
	return errs
}

// Kept reports whether the pool keeps ref as a persistent program.
func (p *Pool) Kept(ref message.ItemHash) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.keepers[ref]
	return ok
}

// Keep keeps ref as a persistent program again (after a restart on
// request), the others as they are.
func (p *Pool) Keep(ref message.ItemHash) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.keepers[ref]; ok || p.draining {
		return
	}
	kctx, stop := context.WithCancel(context.Background())
	p.keepers[ref] = stop
	go p.keep(kctx, ref)
}

// unkeepLocked stops keeping ref: a persistent program stopped on request
// (an operator's stop, an erase) stays stopped until an allocation names
// it again, rather than being booted again over what the request does.
func (p *Pool) unkeepLocked(ref message.ItemHash) {
	if stop, ok := p.keepers[ref]; ok {
		stop()
		delete(p.keepers, ref)
		p.log.Info("persistent program stopped on request: not kept until an allocation names it again", "ref", ref)
	}
}

// Persistent returns the persistent programs the pool keeps.
func (p *Pool) Persistent() []message.ItemHash {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]message.ItemHash, 0, len(p.keepers))
	for ref := range p.keepers {
		out = append(out, ref)
	}
	return out
}

// keep runs the persistent program ref until ctx ends.
func (p *Pool) keep(ctx context.Context, ref message.ItemHash) {
	wait := persistentFirstRetry
	for {
		lease, err := p.Acquire(ctx, ref)
		if err == nil {
			e := lease.exec
			lease.Release()
			p.log.Info("persistent program running", "ref", ref)
			select {
			case <-e.gone:
			case <-ctx.Done():
				return
			}
			if time.Since(e.since) > persistentStable {
				wait = persistentFirstRetry
			}
			p.log.Warn("persistent program ended; starting it again", "ref", ref, "in", wait)
		} else {
			if ctx.Err() != nil {
				return
			}
			p.log.Error("persistent program failed to start", "ref", ref, "err", err, "retry_in", wait)
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
		wait = min(2*wait, persistentMaxRetry)
	}
}

// Detacher is a program VM that can be left running when the node stops.
type Detacher interface {
	Detach()
}

// Adopt runs a persistent program's VM that an earlier node left running
// and the launcher took back, keeping it as SetPersistent would.
func (p *Pool) Adopt(plan *Plan, prog Program) {
	p.mu.Lock()
	defer p.mu.Unlock()
	release := p.opts.Admission.Hold(Capacity{MemoryMiB: plan.MemoryMiB, VCPUs: plan.VCPUs})
	ready := make(chan struct{})
	close(ready)
	e := &execution{plan: plan, ready: ready, prog: prog, since: time.Now(), release: release, gone: make(chan struct{})}
	p.setStateLocked(e, running)
	p.execs[plan.Ref] = e
	go p.watch(e)
	if _, ok := p.keepers[plan.Ref]; !ok {
		kctx, stop := context.WithCancel(context.Background())
		p.keepers[plan.Ref] = stop
		go p.keep(kctx, plan.Ref)
	}
}

// detachKeptLocked leaves the persistent programs the pool keeps running
// as the node stops: their VMs outlive it.
func (p *Pool) detachKeptLocked() {
	for ref, e := range p.execs {
		d, ok := e.prog.(Detacher)
		if _, kept := p.keepers[ref]; !kept || !ok || !e.plan.Persistent || e.state != running {
			continue
		}
		delete(p.execs, ref)
		p.setStateLocked(e, stopping)
		d.Detach()
		e.release()
		close(e.gone)
		p.log.Info("persistent program left running", "ref", ref)
	}
}
