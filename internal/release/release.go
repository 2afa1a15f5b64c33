// Package release keeps what a VM's start made, so that it is released in
// reverse order on every path: each step that makes something (a tap and
// its rules, a directory, a disk, a pinned file, a record, a VM process)
// adds its release right after it succeeds; a start that fails releases
// the list, a start that succeeds hands it to the running VM, whose stop
// releases it. It is the shape of e2b's cleanup and incus's revert.
package release

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// List is the releases of what was made, in the order it was made. The
// zero value is an empty list.
type List struct {
	mu       sync.Mutex
	steps    []step
	released bool
}

type step struct {
	what string
	fn   func(context.Context) error
}

// Add registers the release of what was just made.
func (l *List) Add(what string, fn func(context.Context) error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.steps = append(l.steps, step{what, fn})
}

// AddFunc registers a release that cannot fail.
func (l *List) AddFunc(what string, fn func()) {
	l.Add(what, func(context.Context) error { fn(); return nil })
}

// Release runs every release, last made first, once: a later call does
// nothing. Every step runs even when an earlier one failed; the errors
// are joined, each with what it released.
func (l *List) Release(ctx context.Context) error {
	l.mu.Lock()
	if l.released {
		l.mu.Unlock()
		return nil
	}
	l.released = true
	steps := l.steps
	l.steps = nil
	l.mu.Unlock()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if err := steps[i].fn(ctx); err != nil {
			errs = append(errs, fmt.Errorf("release %s: %w", steps[i].what, err))
		}
	}
	return errors.Join(errs...)
}

// Len is the number of releases registered and not yet run.
func (l *List) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.steps)
}
