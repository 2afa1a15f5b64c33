package api

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/alephvm/alephvm/network"
	"github.com/alephvm/alephvm/pool"
)

// upstreams keeps the proxy's idle HTTP/1.1 connections to program VMs,
// per running program (not per address: a VM that stops may leave its
// address to another program), for the next request to reuse.
type upstreams struct {
	maxPerProgram int
	maxTotal      int
	// idleTimeout closes a connection left idle that long.
	idleTimeout time.Duration
	// defaultProbeAfter is the idle time past which a connection is checked
	// before it is reused (see defaultProbeAfter).
	probeAfter  time.Duration
	dialTimeout time.Duration
	dialer      net.Dialer

	// A connection to a VM that timed out has the VM looked at (see
	// suspect): guestPackets counts what its tap got from its guest, and
	// unresponsive is told of a VM that sent nothing while it was called
	// once more for probeTimeout. Either nil: no look.
	guestPackets func(tap string) (uint64, error)
	unresponsive func(prog pool.Program, why string) bool
	probeTimeout time.Duration

	mu       sync.Mutex
	idle     map[pool.Program][]*upstreamConn // most recently used last
	total    int
	sweeping bool
	probing  map[pool.Program]bool
}

// defaultProbeAfter is the idle time past which a connection is checked before
// it is reused: a program's HTTP server closes connections idle for a few
// seconds (uvicorn after 5), and a request written on one of those would
// fail for nothing. Connections reused sooner are not checked, to save the
// system call; a request that loses that race is retried (see retryable).
const defaultProbeAfter = time.Second

func newUpstreams() *upstreams {
	return &upstreams{maxPerProgram: 1024, maxTotal: 4096, idleTimeout: 90 * time.Second, probeAfter: defaultProbeAfter, dialTimeout: 5 * time.Second,
		dialer: net.Dialer{KeepAlive: 30 * time.Second}, idle: map[pool.Program][]*upstreamConn{},
		guestPackets: network.GuestPackets, probeTimeout: 3 * time.Second, probing: map[pool.Program]bool{}}
}

// upstreamConn is a kept-alive connection to one program.
type upstreamConn struct {
	conn net.Conn
	br   *bufio.Reader
	bw   *bufio.Writer
	prog pool.Program
	// prefix is the path of the program's target, written before each
	// request's path.
	prefix    string
	idleSince time.Time
	// received tells whether anything was read since the last request was
	// written: a request that failed before its answer's first byte may be
	// retried.
	received bool
	// raw makes the reads and writes of br and bw; nil when not TCP.
	raw *rawIO

	// req is the fast path's request, kept for the next one's bytes.
	// send leaves it to the answer's first read when raw is set (pending),
	// which writes it, then waits for the answer without a read that could
	// only find nothing; sendErr is that write's error, once the answer's
	// read is done.
	req     []byte
	pending bool
	sendErr error
}

// send writes req, or leaves it to the answer's first read.
func (c *upstreamConn) send() error {
	c.sendErr = nil
	if c.raw != nil && c.br.Buffered() == 0 {
		c.pending = true
		return nil
	}
	var err error
	if c.raw != nil {
		_, err = c.raw.Write(c.req)
	} else {
		_, err = c.conn.Write(c.req)
	}
	c.sendErr = err
	return err
}

// Read reads from the connection, noting that something came; a pending
// request is written first.
func (c *upstreamConn) Read(p []byte) (int, error) {
	var n int
	var err error
	switch {
	case c.pending:
		c.pending = false
		n, c.sendErr, err = c.raw.writeThenRead(c.req, p)
		if c.sendErr != nil {
			err = c.sendErr
		}
	case c.raw != nil:
		n, err = c.raw.Read(p)
	default:
		n, err = c.conn.Read(p)
	}
	if n > 0 {
		c.received = true
	}
	return n, err
}

// get returns an idle connection to prog, or a new one; reused says which.
// A new connection must be made before deadline (zero for none).
func (u *upstreams) get(ctx context.Context, prog pool.Program, deadline time.Time) (c *upstreamConn, reused bool, err error) {
	u.mu.Lock()
	for {
		list := u.idle[prog]
		if len(list) == 0 {
			break
		}
		c = list[len(list)-1]
		list[len(list)-1] = nil
		u.idle[prog] = list[:len(list)-1]
		u.total--
		u.mu.Unlock()
		if time.Since(c.idleSince) < u.probeAfter || c.alive() {
			c.received = false
			return c, true, nil
		}
		c.conn.Close()
		u.mu.Lock()
	}
	u.mu.Unlock()
	c, err = u.dial(ctx, prog, deadline)
	return c, false, err
}

func (u *upstreams) dial(ctx context.Context, prog pool.Program, deadline time.Time) (*upstreamConn, error) {
	target := prog.Target()
	limit := time.Now().Add(u.dialTimeout)
	if !deadline.IsZero() && deadline.Before(limit) {
		limit = deadline
	}
	ctx, cancel := context.WithDeadline(ctx, limit)
	defer cancel()
	conn, err := u.dialer.DialContext(ctx, "tcp", target.Host)
	// A VM that has just said it listens can still miss the host's first
	// neighbour resolution (seen under heavy CPU load: EHOSTUNREACH at
	// once, from a resolution that failed while the guest was busy): the
	// next attempt resolves again. Retried until the dial's deadline.
	for wait := 50 * time.Millisecond; err != nil && transientDialError(err); wait = min(2*wait, time.Second) {
		select {
		case <-ctx.Done():
		case <-prog.Done():
		case <-time.After(wait):
			conn, err = u.dialer.DialContext(ctx, "tcp", target.Host)
			continue
		}
		break
	}
	if err != nil {
		if timedOut(err) {
			u.suspect(prog)
		}
		return nil, fmt.Errorf("connect to %s: %w", target.Host, err)
	}
	c := &upstreamConn{conn: conn, prog: prog, prefix: strings.TrimSuffix(target.EscapedPath(), "/"), raw: newRawIO(conn)}
	c.br = bufio.NewReaderSize(c, 4<<10)
	if c.raw != nil {
		c.bw = bufio.NewWriterSize(c.raw, 4<<10)
	} else {
		c.bw = bufio.NewWriterSize(conn, 4<<10)
	}
	return c, nil
}

// suspect looks, away from the request, at the VM of prog, to which a
// connection timed out: if it sends nothing while it is called once more,
// it is unresponsive, and the pool stops it for the next request to boot
// another. A VM on the host's own link that takes no connection for
// seconds is busy or dead, and only a dead one is silent: a busy guest
// still answers the call (or refuses it), or at least goes on answering
// its other connections. (A guest's network was seen to stop for good
// under load, QEMU's lost virtqueue notification; see qemu.SMP.) Without
// this, every request to it would wait in vain until the program went
// idle, which its callers would never let it be.
func (u *upstreams) suspect(prog pool.Program) {
	tap := prog.Networking().Tap
	if u.guestPackets == nil || u.unresponsive == nil || tap == "" {
		return
	}
	u.mu.Lock()
	if u.probing[prog] {
		u.mu.Unlock()
		return
	}
	u.probing[prog] = true
	u.mu.Unlock()
	go func() {
		defer func() {
			u.mu.Lock()
			delete(u.probing, prog)
			u.mu.Unlock()
		}()
		if u.silent(prog, tap) {
			u.unresponsive(prog, fmt.Sprintf("a connection to it timed out, then its tap %s got nothing from it while it was called again for %s", tap, u.probeTimeout))
		}
	}()
}

// silent says whether prog's guest sent nothing on its tap while a
// connection to it was tried for probeTimeout, and timed out.
func (u *upstreams) silent(prog pool.Program, tap string) bool {
	before, err := u.guestPackets(tap)
	if err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), u.probeTimeout)
	defer cancel()
	conn, err := u.dialer.DialContext(ctx, "tcp", prog.Target().Host)
	if err == nil {
		conn.Close()
		return false
	}
	select {
	case <-prog.Done():
		return false
	default:
	}
	after, errAfter := u.guestPackets(tap)
	return timedOut(err) && errAfter == nil && after == before
}

// timedOut says whether err is a timeout.
func timedOut(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// transientDialError says whether a failed connection to a VM is worth
// trying again: its address unreachable for now, or nothing listening yet.
func transientDialError(err error) bool {
	return errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.ECONNREFUSED)
}

// put keeps c for the next request to its program, unless the pool is
// full or the program has stopped.
func (u *upstreams) put(c *upstreamConn) {
	select {
	case <-c.prog.Done():
		c.conn.Close()
		return
	default:
	}
	c.idleSince = time.Now()
	if cap(c.req) > 4<<10 {
		c.req = nil // a large upload's: not kept by every idle connection
	}
	u.mu.Lock()
	list := u.idle[c.prog]
	if u.total >= u.maxTotal || len(list) >= u.maxPerProgram {
		u.mu.Unlock()
		c.conn.Close()
		return
	}
	u.idle[c.prog] = append(list, c)
	u.total++
	if !u.sweeping {
		u.sweeping = true
		time.AfterFunc(u.idleTimeout/3, u.sweep)
	}
	u.mu.Unlock()
}

// sweep closes the connections idle for longer than idleTimeout and those
// of stopped programs; it comes back while any connection is idle.
func (u *upstreams) sweep() {
	var expired []*upstreamConn
	u.mu.Lock()
	now := time.Now()
	for prog, list := range u.idle {
		stopped := false
		select {
		case <-prog.Done():
			stopped = true
		default:
		}
		kept := list[:0]
		for _, c := range list {
			if stopped || now.Sub(c.idleSince) > u.idleTimeout {
				expired = append(expired, c)
				continue
			}
			kept = append(kept, c)
		}
		clear(list[len(kept):])
		u.total -= len(list) - len(kept)
		if len(kept) == 0 {
			delete(u.idle, prog)
		} else {
			u.idle[prog] = kept
		}
	}
	if u.total > 0 {
		time.AfterFunc(u.idleTimeout/3, u.sweep)
	} else {
		u.sweeping = false
	}
	u.mu.Unlock()
	for _, c := range expired {
		c.conn.Close()
	}
}

// idleCount is the number of idle connections to prog.
func (u *upstreams) idleCount(prog pool.Program) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.idle[prog])
}

// alive tells, without waiting, whether the program has not closed c
// while it was idle: nothing is there to read and the connection is open.
func (c *upstreamConn) alive() bool {
	if c.br.Buffered() > 0 {
		return false // an answer nobody asked for
	}
	quiet, _ := probe(c.conn)
	return quiet
}

// probe looks at a connection without waiting: quiet when it is open
// with nothing to read, closed when its peer closed or reset it.
func probe(c net.Conn) (quiet, closed bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true, false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false, true
	}
	// Control, not Read: a read deadline passed must not stop the look.
	err = raw.Control(func(fd uintptr) {
		var b [1]byte
		n, _, rerr := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		quiet = errors.Is(rerr, syscall.EAGAIN)
		closed = !quiet && (rerr != nil || n == 0)
	})
	if err != nil {
		return false, true
	}
	return quiet, closed
}
