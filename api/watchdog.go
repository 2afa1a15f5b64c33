package api

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// watchdog ends the exchanges with programs that must end: those whose
// program sent no answer's headers within its resources.seconds, and those
// whose client left. One goroutine looks at them all a few times a second,
// while there are any, instead of a timer and a context per request.
//
// The exchanges are spread over shards, each with its lock: every request
// adds and removes one, and a single lock, also held while the goroutine
// looks at all of them, was the proxy's most contended.
type watchdog struct {
	tick time.Duration

	shards  [watchShards]watchShard
	next    atomic.Uint32
	active  atomic.Int64 // exchanges watched
	mu      sync.Mutex   // running's
	running bool
}

const watchShards = 16

type watchShard struct {
	mu      sync.Mutex
	watched []*exchange
	_       [32]byte // a cache line each
}

// Why an exchange was ended by the watchdog.
const (
	notAborted int32 = iota
	abortedTimeout
	abortedClientLeft
)

// exchange is what the watchdog knows of one request to a program.
type exchange struct {
	ctx context.Context
	// deadline for the answer's headers, in Unix nanoseconds; 0 for none.
	deadline atomic.Int64
	// up is the connection to the program the request is on, if any.
	up     atomic.Pointer[upstreamConn]
	reason atomic.Int32
	shard  int
	slot   int
	// client is the client's connection on the fast path, which has no
	// context: from probeAfter on, it is probed every probeEvery.
	client *clientConn
	since  int64 // Unix nanoseconds
	probed int64
}

// When the watchdog looks whether the client of a fast-path exchange left.
const (
	probeAfter = int64(time.Second)
	probeEvery = int64(250 * time.Millisecond)
)

// clientGone probes the client of a fast-path exchange, not too often.
func (x *exchange) clientGone(now int64) bool {
	if now-x.since < probeAfter || now-x.probed < probeEvery {
		return false
	}
	x.probed = now
	return x.client.gone()
}

// aLongTimeAgo, set as a connection's deadline, fails its pending and
// future reads and writes at once.
var aLongTimeAgo = time.Unix(1, 0)

func (x *exchange) abort(reason int32) {
	if x.reason.CompareAndSwap(notAborted, reason) {
		if up := x.up.Load(); up != nil {
			_ = up.conn.SetDeadline(aLongTimeAgo)
		}
	}
}

// setConn puts the exchange on up; it is aborted at once if the watchdog
// already ended it.
func (x *exchange) setConn(up *upstreamConn) {
	x.up.Store(up)
	if r := x.reason.Load(); r != notAborted {
		_ = up.conn.SetDeadline(aLongTimeAgo)
	}
}

// failure is the error of an exchange that failed with err: the
// watchdog's reason, or the passed deadline, first.
func (x *exchange) failure(err error) error {
	switch x.reason.Load() {
	case abortedTimeout:
		return errProgramTimeout
	case abortedClientLeft:
		return errClientLeft
	}
	if d := x.deadline.Load(); d != 0 && time.Now().UnixNano() >= d {
		return errProgramTimeout
	}
	return err
}

func (x *exchange) check(now int64) {
	if x.reason.Load() != notAborted {
		return
	}
	if x.ctx != nil && x.ctx.Err() != nil || x.client != nil && x.clientGone(now) {
		x.abort(abortedClientLeft)
		return
	}
	if d := x.deadline.Load(); d != 0 && now >= d {
		x.abort(abortedTimeout)
	}
}

// watch starts watching x.
func (d *watchdog) watch(x *exchange) {
	x.shard = int(d.next.Add(1) % watchShards)
	sh := &d.shards[x.shard]
	sh.mu.Lock()
	x.slot = len(sh.watched)
	sh.watched = append(sh.watched, x)
	sh.mu.Unlock()
	if d.active.Add(1) == 1 {
		d.mu.Lock()
		if !d.running {
			d.running = true
			go d.run()
		}
		d.mu.Unlock()
	}
}

// unwatch stops watching x: once it returns, x is aborted no more.
func (d *watchdog) unwatch(x *exchange) {
	sh := &d.shards[x.shard]
	sh.mu.Lock()
	last := len(sh.watched) - 1
	moved := sh.watched[last]
	sh.watched[x.slot], moved.slot = moved, x.slot
	sh.watched[last] = nil
	sh.watched = sh.watched[:last]
	sh.mu.Unlock()
	d.active.Add(-1)
}

func (d *watchdog) run() {
	t := time.NewTicker(d.tick)
	defer t.Stop()
	for now := range t.C {
		if d.active.Load() == 0 {
			// Ends unless an exchange came meanwhile; one that comes after
			// finds running false and starts another run.
			d.mu.Lock()
			if d.active.Load() == 0 {
				d.running = false
				d.mu.Unlock()
				return
			}
			d.mu.Unlock()
		}
		n := now.UnixNano()
		for i := range d.shards {
			sh := &d.shards[i]
			sh.mu.Lock()
			for _, x := range sh.watched {
				x.check(n)
			}
			sh.mu.Unlock()
		}
	}
}
