package pool

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/alephvm/alephvm/message"
)

// TestPersistentPrograms: a persistent program runs without requests,
// is not stopped for being idle, is booted again when its VM ends, and is
// stopped when the allocation drops it.
func TestPersistentPrograms(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128, persist: true}
	p := newPool(l, 10*time.Millisecond)
	if errs := p.SetPersistent(context.Background(), []message.ItemHash{ref}); len(errs) != 0 {
		t.Fatalf("refused: %v", errs)
	}
	eventually(t, "the first boot", func() bool { return l.boots.Load() == 1 && len(p.List()) == 1 && p.List()[0].Running })
	time.Sleep(100 * time.Millisecond) // ten reuse timeouts
	if first := l.last(); first.stopped.Load() || len(p.List()) != 1 {
		t.Fatal("a persistent program was stopped for being idle")
	}
	// Its VM dies: it is booted again.
	l.last().exit()
	eventually(t, "a boot after the VM ended", func() bool { return l.boots.Load() == 2 && len(p.List()) == 1 && p.List()[0].Running })
	// Listed again: nothing changes.
	p.SetPersistent(context.Background(), []message.ItemHash{ref})
	if got := p.Persistent(); len(got) != 1 || l.boots.Load() != 2 {
		t.Errorf("kept %v after %d boots", got, l.boots.Load())
	}
	// Dropped: stopped, and not booted again.
	second := l.last()
	p.SetPersistent(context.Background(), nil)
	eventually(t, "the stop", func() bool { return second.stopped.Load() && len(p.List()) == 0 })
	time.Sleep(1500 * time.Millisecond)
	if n := l.boots.Load(); n != 2 || len(p.Persistent()) != 0 {
		t.Errorf("%d boots after the drop, persistent %v", n, p.Persistent())
	}
}

func TestPersistentRefusesOrdinaryPrograms(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128}
	p := newPool(l, time.Minute)
	errs := p.SetPersistent(context.Background(), []message.ItemHash{ref})
	if !errors.Is(errs[ref], ErrNotPersistent) || len(p.Persistent()) != 0 || l.boots.Load() != 0 {
		t.Errorf("an ordinary program: %v, kept %v, %d boots", errs, p.Persistent(), l.boots.Load())
	}
}

// TestPersistentRetriesAFailingBoot waits between tries.
func TestPersistentRetriesAFailingBoot(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128, persist: true, fail: errors.New("no")}
	p := newPool(l, time.Minute)
	p.SetPersistent(context.Background(), []message.ItemHash{ref})
	time.Sleep(2500 * time.Millisecond) // tries at 0, 1 s and 3 s
	if n := l.boots.Load(); n != 2 {
		t.Errorf("%d tries in 2.5 s, want 2 (1 s, then 2 s between them)", n)
	}
	p.Shutdown(context.Background())
}

type detachable struct {
	*fakeProgram
	detached bool
}

func (d *detachable) Detach() { d.detached = true; d.exit() }

// TestKeptProgramsOutliveShutdown: at the node's shutdown a kept
// persistent program is detached, not stopped; an adopted one is kept.
func TestKeptProgramsOutliveShutdown(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128, persist: true}
	p := newPool(l, time.Minute)
	prog := &detachable{fakeProgram: &fakeProgram{done: make(chan struct{})}}
	plan, _ := l.Plan(context.Background(), ref)
	p.Adopt(plan, prog)
	if got := p.Persistent(); len(got) != 1 || len(p.List()) != 1 || !p.List()[0].Running {
		t.Fatalf("adopted: kept %v, list %v", got, p.List())
	}
	time.Sleep(50 * time.Millisecond)
	if l.boots.Load() != 0 {
		t.Fatalf("an adopted program was booted again (%d)", l.boots.Load())
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !prog.detached || prog.stopped.Load() {
		t.Errorf("detached %v, stopped %v", prog.detached, prog.stopped.Load())
	}
}

// TestStoppedOnRequest: an operator's stop (or an erase) of a persistent
// program is not undone by its keeper; Keep keeps it again.
func TestStoppedOnRequest(t *testing.T) {
	l := &fakeLauncher{revision: "r1", memory: 128, persist: true}
	p := newPool(l, time.Minute)
	p.SetPersistent(context.Background(), []message.ItemHash{ref})
	eventually(t, "the boot", func() bool { return len(p.List()) == 1 && p.List()[0].Running })
	if !p.Stop(ref) || p.Kept(ref) {
		t.Fatalf("stop: kept %v", p.Kept(ref))
	}
	time.Sleep(1500 * time.Millisecond)
	if n := l.boots.Load(); n != 1 || len(p.List()) != 0 {
		t.Errorf("booted again after a stop on request: %d boots", n)
	}
	p.Keep(ref)
	eventually(t, "the boot once kept again", func() bool { return l.boots.Load() == 2 && p.Kept(ref) })
	p.Shutdown(context.Background())
}
