package store

import (
	"context"
	"sync"
)

// flights runs one download per key however many callers ask for it at
// once. Unlike a plain singleflight, the work does not run on the first
// caller's context: it goes on while any caller still waits, and is
// cancelled when the last one gives up.
type flights struct {
	mu sync.Mutex
	m  map[string]*flight
}

type flight struct {
	done      chan struct{}
	err       error // set before done is closed
	waiters   int
	abandoned bool
	cancel    context.CancelFunc
}

// do runs fn for key unless a run is under way, and waits for it or ctx.
func (g *flights) do(ctx context.Context, key string, fn func(context.Context) error) error {
	g.mu.Lock()
	f, ok := g.m[key]
	if !ok || f.abandoned {
		// An abandoned run is still winding down; the new one waits for
		// what it holds (the .part lock) and starts afresh.
		runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel}
		if g.m == nil {
			g.m = map[string]*flight{}
		}
		g.m[key] = f
		go func() {
			err := fn(runCtx)
			g.mu.Lock()
			if g.m[key] == f {
				delete(g.m, key)
			}
			f.err = err
			g.mu.Unlock()
			cancel()
			close(f.done)
		}()
	}
	f.waiters++
	g.mu.Unlock()
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		g.mu.Lock()
		if f.waiters--; f.waiters == 0 {
			f.abandoned = true
			f.cancel()
		}
		g.mu.Unlock()
		return context.Cause(ctx)
	}
}
