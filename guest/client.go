package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
)

// ErrClosed is returned by calls on a client whose connection is closed.
var ErrClosed = errors.New("guest control connection closed")

// Client is the host's side of the control protocol, over one connection
// (see DialSerial, and firecracker.DialVsock). Its methods may be called concurrently:
// each call has its own id and the replies are matched to it.
type Client struct {
	conn  io.ReadWriteCloser
	wmu   sync.Mutex
	hello Hello

	mu      sync.Mutex
	next    uint64
	calls   map[uint64]*call
	status  Status
	changed chan struct{} // closed and replaced when status changes
	err     error
	done    chan struct{}

	events chan Event
}

type call struct {
	logs  chan LogLine
	final chan reply
}

// eventBuffer and logBuffer bound what the client keeps for a slow
// reader: events beyond it are dropped (Status and WaitFor still see the
// state), and so are log lines (a gap in LogLine.Seq shows it).
const (
	eventBuffer = 64
	logBuffer   = 4096
)

// NewClient starts a session on conn: it sends the hello and waits for
// the guest's answer, which comes once the init has opened its control
// channel, so ctx should allow for the VM's boot. The client owns conn
// from then on.
func NewClient(ctx context.Context, conn io.ReadWriteCloser) (*Client, error) {
	c := &Client{
		conn:    conn,
		calls:   map[uint64]*call{},
		changed: make(chan struct{}),
		done:    make(chan struct{}),
		events:  make(chan Event, eventBuffer),
	}
	go c.read()
	// The empty line ends whatever a previous session left half-written.
	c.wmu.Lock()
	_, err := conn.Write([]byte("\n"))
	c.wmu.Unlock()
	if err != nil {
		conn.Close()
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
// reported by Hello, not as events.
func (c *Client) Events() <-chan Event { return c.events }

// Done is closed when the connection is lost or closed.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the session.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Status asks the guest for the workload's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	r, err := c.call(ctx, request{Op: opStatus}, nil)
	if err != nil {
		return Status{}, fmt.Errorf("guest status: %w", err)
	}
	c.setStatus(*r.Status)
	return *r.Status, nil
}

// WaitFor waits until the workload's status, as last reported by the
// guest (hello, events, Status), satisfies done.
func (c *Client) WaitFor(ctx context.Context, done func(Status) bool) (Status, error) {
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
// an error). fn runs on its own goroutine and should be quick.
func (c *Client) Logs(ctx context.Context, follow bool, fn func(LogLine)) error {
	lines := make(chan LogLine, logBuffer)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for l := range lines {
			fn(l)
		}
	}()
	_, err := c.call(ctx, request{Op: opLogs, Follow: follow}, lines)
	close(lines)
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
func (c *Client) Exec(ctx context.Context, req ExecRequest) (ExecResult, error) {
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
func (c *Client) call(ctx context.Context, req request, logs chan LogLine) (reply, error) {
	cl := &call{logs: logs, final: make(chan reply, 1)}
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
		return reply{}, c.closeErr()
	case <-ctx.Done():
		forget()
		c.send(request{Op: opCancel, Target: req.ID})
		return reply{}, ctx.Err()
	}
}

// checkReply makes sure a final reply carries what its operation returns.
func checkReply(op string, r reply) error {
	missing := false
	switch op {
	case opHello:
		missing = r.Hello == nil
	case opStatus:
		missing = r.Status == nil
	case opExec:
		missing = r.Exec == nil
	case opSysinfo:
		missing = r.Sysinfo == nil
	}
	if missing {
		return fmt.Errorf("guest replied to %s without a result", op)
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

func (c *Client) closeErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) setStatus(s Status) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.status = s
	close(c.changed)
	c.changed = make(chan struct{})
}

// read dispatches the guest's lines until the connection ends.
func (c *Client) read() {
	br := bufio.NewReaderSize(c.conn, 64<<10)
	var err error
	for {
		var line []byte
		line, err = readLine(br)
		if err != nil {
			break
		}
		var r reply
		if json.Unmarshal(line, &r) != nil {
			continue // the tail of a line from an earlier session
		}
		if r.ID == 0 {
			if r.Event != nil {
				c.setStatus(r.Event.Status)
				select {
				case c.events <- *r.Event:
				default:
				}
			}
			continue
		}
		// Sends under the lock and never blocking, so that a call that
		// gives up (and closes its log channel) cannot race with them.
		c.mu.Lock()
		if cl := c.calls[r.ID]; cl != nil {
			switch {
			case r.Done:
				delete(c.calls, r.ID)
				cl.final <- r
			case r.Log != nil && cl.logs != nil:
				select {
				case cl.logs <- *r.Log:
				default:
				}
			}
		}
		c.mu.Unlock()
	}
	if errors.Is(err, io.EOF) {
		err = ErrClosed
	} else {
		err = fmt.Errorf("%w: %v", ErrClosed, err)
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
