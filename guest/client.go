package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"
)

// ErrClosed is returned by calls on a client whose connection is closed.
var ErrClosed = errors.New("guest control connection closed")

// Client is the host's side of the control protocol, over one connection
// (see DialSerial, and firecracker.DialVsock). Its methods may be called concurrently:
// each call has its own id and the replies are matched to it.
//
// The guest is not trusted: a line longer than the protocol allows ends
// the session with an error wrapping ErrProtocol; texts are cut to their
// bounds (MaxLogText, MaxErrorText, and 64 bytes for a state or an event
// type); what the client keeps for slow readers is bounded in lines and
// bytes; and the guest's lines are read at most at guestRate bytes a
// second (past a burst), so that a guest that floods its channel costs
// the node a bounded share of a CPU and the guest's writes wait.
type Client struct {
	conn  io.ReadWriteCloser
	wmu   sync.Mutex
	hello Hello

	mu      sync.Mutex
	next    uint64
	calls   map[uint64]*call
	status  Status
	changed chan struct{} // closed and replaced when status changes
	refresh time.Duration // statusRefresh, but in tests
	err     error
	done    chan struct{}

	closeOnce sync.Once
	closeErr  error
	closing   chan struct{} // closed by Close: a throttled reader stops waiting

	events chan Event
	limit  *throttle
}

type call struct {
	logs  *logQueue
	final chan reply
	api   chan APICall // the workload's guest API calls (ServeAPI)
}

// Bounds of what the client keeps for a slow reader: past eventBuffer
// events, the oldest are dropped (Status and WaitFor still see the
// state); log lines past logQueueLines or logQueueBytes are dropped too
// (a gap in LogLine.Seq shows it).
const (
	eventBuffer   = 64
	logQueueLines = 4096
	logQueueBytes = 4 << 20
)

// guestRate and guestBurst bound how fast the client reads the guest's
// lines, in bytes: a burst holds the largest reply (an exec's) and the
// init's whole log ring several times over.
const (
	guestRate  = 8 << 20
	guestBurst = 16 << 20
)

// NewClient starts a session on conn: it sends the hello and waits for
// the guest's answer, which comes once the init has opened its control
// channel, so ctx should allow for the VM's boot. The client owns conn
// from then on.
func NewClient(ctx context.Context, conn io.ReadWriteCloser) (*Client, error) {
	return newClient(ctx, conn, newThrottle(guestRate, guestBurst, time.Now, nil))
}

func newClient(ctx context.Context, conn io.ReadWriteCloser, limit *throttle) (*Client, error) {
	c := &Client{
		conn:    conn,
		calls:   map[uint64]*call{},
		changed: make(chan struct{}),
		done:    make(chan struct{}),
		closing: make(chan struct{}),
		events:  make(chan Event, eventBuffer),
		limit:   limit,
		refresh: statusRefresh,
	}
	if limit.sleep == nil {
		limit.sleep = c.sleep
	}
	go c.read()
	// The empty line ends whatever a previous session left half-written.
	c.wmu.Lock()
	_, err := conn.Write([]byte("\n"))
	c.wmu.Unlock()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("guest hello: %w", err)
	}
	r, err := c.call(ctx, request{Op: opHello}, nil)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("guest hello: %w", err)
	}
	c.hello = *r.Hello
	c.setStatus(r.Hello.Status)
	return c, nil
}

// Hello returns the guest's answer to the session's hello.
func (c *Client) Hello() Hello { return c.hello }

// Events returns the guest's asynchronous events: ready, exited, oom and
// failed. The state the guest had reached when the session started is
// reported by Hello, not as events. Past a buffer of 64 events that no
// one reads, the oldest are dropped (WaitFor still sees the latest status).
//
// The channel is closed exactly once, when the connection ends, after
// Done is closed: a reader must stop when it receives nothing (ok false),
// or it would spin.
func (c *Client) Events() <-chan Event { return c.events }

// Done is closed when the connection is lost or closed.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended (wrapping ErrClosed, and
// ErrProtocol when the guest broke the protocol), or nil while it is open.
func (c *Client) Err() error {
	select {
	case <-c.done:
		return c.connErr()
	default:
		return nil
	}
}

// Close ends the session and waits for the client's reader to return. It
// may be called more than once.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		close(c.closing)
		c.closeErr = c.conn.Close()
	})
	<-c.done
	return c.closeErr
}

// Status asks the guest for the workload's status; if an event brought a
// later one meanwhile, it returns that.
func (c *Client) Status(ctx context.Context) (Status, error) {
	r, err := c.call(ctx, request{Op: opStatus}, nil)
	if err != nil {
		return Status{}, fmt.Errorf("guest status: %w", err)
	}
	return c.setStatus(*r.Status), nil
}

// statusRefresh is how often WaitFor asks the guest for its status while
// no event comes: a status the guest reported but the host missed (an
// init from before statuses were numbered, whose stale answer hid an
// event) costs that long, not the whole wait.
const statusRefresh = 3 * time.Second

// WaitFor waits until the workload's status, as last reported by the
// guest (hello, events, Status), satisfies done.
func (c *Client) WaitFor(ctx context.Context, done func(Status) bool) (Status, error) {
	refresh := time.NewTimer(c.refresh)
	defer refresh.Stop()
	for {
		c.mu.Lock()
		st, changed, err := c.status, c.changed, c.err
		c.mu.Unlock()
		if done(st) {
			return st, nil
		}
		if err != nil {
			return st, err
		}
		select {
		case <-changed:
		case <-refresh.C:
			askCtx, cancel := context.WithTimeout(ctx, c.refresh)
			_, _ = c.Status(askCtx) // kept by setStatus; a failure shows in c.err
			cancel()
			refresh.Reset(c.refresh)
		case <-ctx.Done():
			return st, ctx.Err()
		}
	}
}

// Settled reports whether the workload is ready or will never be: the
// condition to wait for after a boot.
func Settled(s Status) bool {
	switch s.State {
	case StateReady, StateExited, StateFailed:
		return true
	}
	return false
}

// Logs calls fn with the workload's retained output lines, oldest first,
// then, with follow, with every new line until ctx ends (which then is not
// an error). fn runs on its own goroutine and should be quick: lines that
// arrive while it lags more than logQueueLines lines or logQueueBytes
// bytes behind are dropped (a gap in LogLine.Seq shows it).
func (c *Client) Logs(ctx context.Context, follow bool, fn func(LogLine)) error {
	q := newLogQueue(logQueueLines, logQueueBytes)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		q.drain(fn)
	}()
	_, err := c.call(ctx, request{Op: opLogs, Follow: follow}, q)
	q.close()
	<-finished
	if err != nil {
		if follow && ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("guest logs: %w", err)
	}
	return nil
}

// Signal sends sig to the workload's main process.
func (c *Client) Signal(ctx context.Context, sig syscall.Signal) error {
	if _, err := c.call(ctx, request{Op: opSignal, Signal: int(sig)}, nil); err != nil {
		return fmt.Errorf("guest signal %d: %w", sig, err)
	}
	return nil
}

// Exec runs a command in the guest and returns its output and exit code.
// Its stdin is at most MaxExecInput bytes.
func (c *Client) Exec(ctx context.Context, req ExecRequest) (ExecResult, error) {
	if len(req.Stdin) > MaxExecInput {
		return ExecResult{}, fmt.Errorf("guest exec %q: stdin of %d bytes, more than %d", req.Argv, len(req.Stdin), MaxExecInput)
	}
	r, err := c.call(ctx, request{Op: opExec, Exec: &req}, nil)
	if err != nil {
		return ExecResult{}, fmt.Errorf("guest exec %q: %w", req.Argv, err)
	}
	return *r.Exec, nil
}

// Sysinfo returns the guest's resource usage.
func (c *Client) Sysinfo(ctx context.Context) (Sysinfo, error) {
	r, err := c.call(ctx, request{Op: opSysinfo}, nil)
	if err != nil {
		return Sysinfo{}, fmt.Errorf("guest sysinfo: %w", err)
	}
	return *r.Sysinfo, nil
}

// Resume gives a VM restored from a template its clock and seed; the
// guest then carries on as after a boot (WaitFor Settled).
func (c *Client) Resume(ctx context.Context, req ResumeRequest) error {
	if len(req.Seed) < MinResumeSeed {
		return fmt.Errorf("guest resume: a seed of %d bytes, fewer than %d", len(req.Seed), MinResumeSeed)
	}
	if _, err := c.call(ctx, request{Op: opResume, Resume: &req}, nil); err != nil {
		return fmt.Errorf("guest resume: %w", err)
	}
	return nil
}

// Halt stops the workload, unmounts every drive and, once it has replied,
// the guest powers off (or reboots, see Config.Halt). The client is closed
// when Halt returns.
func (c *Client) Halt(ctx context.Context) error {
	_, err := c.call(ctx, request{Op: opHalt}, nil)
	c.Close()
	if err != nil {
		return fmt.Errorf("guest halt: %w", err)
	}
	return nil
}

// call sends req and waits for its final reply; log lines go to logs.
func (c *Client) call(ctx context.Context, req request, logs *logQueue) (reply, error) {
	return c.callWith(ctx, req, &call{logs: logs, final: make(chan reply, 1)})
}

// callWith sends req and waits for its final reply, cl receiving the
// others.
func (c *Client) callWith(ctx context.Context, req request, cl *call) (reply, error) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return reply{}, err
	}
	c.next++
	req.ID = c.next
	c.calls[req.ID] = cl
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.calls, req.ID)
		c.mu.Unlock()
	}
	if err := c.send(req); err != nil {
		forget()
		return reply{}, err
	}
	select {
	case r := <-cl.final:
		if r.Error != "" {
			return r, errors.New(r.Error)
		}
		if err := checkReply(req.Op, r); err != nil {
			return r, err
		}
		return r, nil
	case <-c.done:
		forget()
		return reply{}, c.connErr()
	case <-ctx.Done():
		forget()
		c.send(request{Op: opCancel, Target: req.ID})
		return reply{}, ctx.Err()
	}
}

// checkReply makes sure a final reply carries what its operation returns,
// within the protocol's bounds.
func checkReply(op string, r reply) error {
	missing := false
	switch op {
	case opHello:
		missing = r.Hello == nil
	case opStatus:
		missing = r.Status == nil
	case opExec:
		missing = r.Exec == nil
		if r.Exec != nil && (len(r.Exec.Stdout) > MaxExecOutput || len(r.Exec.Stderr) > MaxExecOutput) {
			return fmt.Errorf("%w: exec output of %d and %d bytes, more than %d", ErrProtocol, len(r.Exec.Stdout), len(r.Exec.Stderr), MaxExecOutput)
		}
	case opSysinfo:
		missing = r.Sysinfo == nil
		if r.Sysinfo != nil {
			return checkSysinfo(r.Sysinfo)
		}
	}
	if missing {
		return fmt.Errorf("%w: reply to %s without a result", ErrProtocol, op)
	}
	return nil
}

func checkSysinfo(s *Sysinfo) error {
	if len(s.Mounts) > maxSysinfoEntries || len(s.Network) > maxSysinfoEntries {
		return fmt.Errorf("%w: sysinfo with %d mounts and %d interfaces, more than %d", ErrProtocol, len(s.Mounts), len(s.Network), maxSysinfoEntries)
	}
	for _, m := range s.Mounts {
		if len(m.Path) > maxSysinfoName {
			return fmt.Errorf("%w: sysinfo mount path of %d bytes", ErrProtocol, len(m.Path))
		}
	}
	for _, n := range s.Network {
		if len(n.Interface) > maxSysinfoName {
			return fmt.Errorf("%w: sysinfo interface name of %d bytes", ErrProtocol, len(n.Interface))
		}
	}
	return nil
}

func (c *Client) send(req request) error {
	line, err := json.Marshal(req)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.conn.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("send %s: %w", req.Op, err)
	}
	return nil
}

func (c *Client) connErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// setStatus keeps s unless the client holds a later status (Seq), and
// returns the status it holds.
func (c *Client) setStatus(s Status) Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.Seq < c.status.Seq {
		return c.status
	}
	c.status = s
	close(c.changed)
	c.changed = make(chan struct{})
	return s
}

// sleep waits d, or until Close; it reports whether the client is still
// open.
func (c *Client) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.closing:
		return false
	}
}

// read dispatches the guest's lines until the connection ends, then
// closes done and events (once: it is their only closer).
func (c *Client) read() {
	lr := newLineReader(c.conn)
	var err error
	for {
		var line []byte
		line, err = lr.next()
		if err != nil {
			break
		}
		if !c.limit.spend(len(line) + 1) {
			err = io.EOF // closed while throttled
			break
		}
		var r reply
		if json.Unmarshal(line, &r) != nil {
			continue // the tail of a line from an earlier session
		}
		r.bound()
		if r.ID == 0 {
			if r.Event != nil {
				c.setStatus(r.Event.Status)
				QueueEvent(c.events, *r.Event) // read is its only sender
			}
			continue
		}
		// Under the lock, so that a call that gives up (and closes its
		// log queue) cannot race with the dispatch.
		c.mu.Lock()
		if cl := c.calls[r.ID]; cl != nil {
			switch {
			case r.Done:
				delete(c.calls, r.ID)
				cl.final <- r
			case r.Log != nil && cl.logs != nil && (r.Log.Stream == Stdout || r.Log.Stream == Stderr):
				cl.logs.push(*r.Log)
			case r.API != nil && cl.api != nil && r.API.valid():
				select {
				case cl.api <- *r.API:
				default: // past the bound of calls under way: dropped
				}
			}
		}
		c.mu.Unlock()
	}
	if errors.Is(err, io.EOF) {
		err = ErrClosed
	} else {
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	c.mu.Lock()
	c.err = err
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
	c.conn.Close()
	close(c.done)
	close(c.events)
}

// bound cuts the texts of a reply from the guest to the protocol's
// bounds, so that none is kept or logged whole.
func (r *reply) bound() {
	r.Error = cut(r.Error, MaxErrorText)
	if r.Hello != nil {
		r.Hello.InitVersion = cut(r.Hello.InitVersion, maxVersionText)
		r.Hello.Status.bound()
	}
	if r.Status != nil {
		r.Status.bound()
	}
	if r.Event != nil {
		r.Event.Type = EventType(cut(string(r.Event.Type), maxWordText))
		r.Event.Status.bound()
	}
	if r.Log != nil {
		r.Log.Text = cut(r.Log.Text, MaxLogText)
	}
}

func (s *Status) bound() {
	s.State = State(cut(string(s.State), maxWordText))
	s.Error = cut(s.Error, MaxErrorText)
}

// logQueue hands a call's log lines from the reader, which never waits,
// to the caller's function. Past maxLines or maxBytes the newest lines
// are dropped.
type logQueue struct {
	maxLines, maxBytes int

	mu     sync.Mutex
	lines  []LogLine
	bytes  int
	closed bool
	wake   chan struct{} // holds a token when lines or the close are pending
}

func newLogQueue(maxLines, maxBytes int) *logQueue {
	return &logQueue{maxLines: maxLines, maxBytes: maxBytes, wake: make(chan struct{}, 1)}
}

// logLineCost is what a queued line counts for besides its text.
const logLineCost = 64

func (q *logQueue) push(l LogLine) {
	q.mu.Lock()
	defer q.mu.Unlock()
	cost := len(l.Text) + logLineCost
	if q.closed || len(q.lines) >= q.maxLines || q.bytes+cost > q.maxBytes {
		return
	}
	q.lines = append(q.lines, l)
	q.bytes += cost
	q.signal()
}

func (q *logQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.signal()
}

func (q *logQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// drain calls fn with every line pushed until the queue is closed and
// empty.
func (q *logQueue) drain(fn func(LogLine)) {
	for range q.wake {
		q.mu.Lock()
		batch, closed := q.lines, q.closed
		q.lines, q.bytes = nil, 0
		q.mu.Unlock()
		for _, l := range batch {
			fn(l)
		}
		if closed {
			return
		}
	}
}

// throttle is a token bucket of bytes: spend waits, through sleep, once
// the guest has sent more than burst bytes ahead of rate.
type throttle struct {
	rate, burst float64
	tokens      float64
	last        time.Time
	now         func() time.Time
	sleep       func(time.Duration) bool
}

func newThrottle(rate, burst float64, now func() time.Time, sleep func(time.Duration) bool) *throttle {
	return &throttle{rate: rate, burst: burst, tokens: burst, now: now, sleep: sleep}
}

// spend takes n bytes from the bucket, waiting when it is empty; it
// reports false when the wait was interrupted.
func (t *throttle) spend(n int) bool {
	now := t.now()
	if !t.last.IsZero() {
		t.tokens = min(t.burst, t.tokens+now.Sub(t.last).Seconds()*t.rate)
	}
	t.last = now
	t.tokens -= float64(n)
	if t.tokens >= 0 {
		return true
	}
	return t.sleep(time.Duration(-t.tokens / t.rate * float64(time.Second)))
}
