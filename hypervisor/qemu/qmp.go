package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// QMP is a client of QEMU's machine protocol on a unix socket. Responses
// are matched to requests by id, events arrive at any time, and the
// connection closing means the VM is gone (incus treats it the same way).
// It reads with a json.Decoder, so large replies such as
// query-qmp-schema are fine (go-qemu's line scanner fails on them).
type QMP struct {
	conn net.Conn
	enc  *json.Encoder

	mu      sync.Mutex // guards the fields below and writes to enc
	nextID  int
	pending map[string]chan qmpReply
	err     error // why the connection ended, once it has

	events chan Event
	done   chan struct{}
}

// Event is an asynchronous QMP event, such as SHUTDOWN or RESUME.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

// QMPError is an error answer from QEMU.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *QMPError) Error() string { return "qmp: " + e.Class + ": " + e.Desc }

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *QMPError       `json:"error"`
}

// ErrVMGone is returned for calls on a QMP connection that QEMU closed.
var ErrVMGone = errors.New("qmp: connection closed: the VM is gone")

// DialQMP connects to a QMP socket, reads the greeting and negotiates
// capabilities.
func DialQMP(ctx context.Context, socket string) (*QMP, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connect to QMP socket %s: %w", socket, err)
	}
	q := &QMP{
		conn:    conn,
		enc:     json.NewEncoder(conn),
		pending: map[string]chan qmpReply{},
		events:  make(chan Event, 64),
		done:    make(chan struct{}),
	}
	dec := json.NewDecoder(conn)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	var greeting struct {
		QMP *json.RawMessage `json:"QMP"`
	}
	err = dec.Decode(&greeting)
	stop()
	if err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("read QMP greeting on %s: %v", socket, errors.Join(err, ctx.Err()))
	}
	go q.read(dec)
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

// read dispatches replies and events until the connection ends.
func (q *QMP) read(dec *json.Decoder) {
	var err error
	for {
		var msg struct {
			qmpReply
			ID    *string `json:"id"`
			Event string  `json:"event"`
		}
		var raw json.RawMessage
		if err = dec.Decode(&raw); err != nil {
			break
		}
		if err = json.Unmarshal(raw, &msg); err != nil {
			break
		}
		switch {
		case msg.Event != "":
			var ev Event
			_ = json.Unmarshal(raw, &ev)
			select {
			case q.events <- ev:
			default: // nobody listens: events are advisory
			}
		case msg.ID != nil:
			q.mu.Lock()
			ch := q.pending[*msg.ID]
			delete(q.pending, *msg.ID)
			q.mu.Unlock()
			if ch != nil {
				ch <- msg.qmpReply
			}
		}
	}
	q.mu.Lock()
	q.err = ErrVMGone
	for id, ch := range q.pending {
		close(ch)
		delete(q.pending, id)
	}
	q.mu.Unlock()
	close(q.done)
	close(q.events)
}

// Execute runs a QMP command. args, if not nil, is marshaled as its
// arguments; the reply's return value is unmarshaled into out if not nil.
func (q *QMP) Execute(ctx context.Context, command string, args, out any) error {
	return q.execute(ctx, command, args, out, nil)
}

// ExecuteWithFile runs a QMP command with f's descriptor passed along it
// (SCM_RIGHTS), as getfd and add-fd take one.
func (q *QMP) ExecuteWithFile(ctx context.Context, command string, args, out any, f *os.File) error {
	return q.execute(ctx, command, args, out, f)
}

func (q *QMP) execute(ctx context.Context, command string, args, out any, f *os.File) error {
	ch := make(chan qmpReply, 1)
	q.mu.Lock()
	if q.err != nil {
		q.mu.Unlock()
		return q.err
	}
	q.nextID++
	id := strconv.Itoa(q.nextID)
	q.pending[id] = ch
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{command, args, id}
	var err error
	if f == nil {
		err = q.enc.Encode(req)
	} else {
		err = q.sendWithFile(req, f)
	}
	q.mu.Unlock()
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	select {
	case reply, ok := <-ch:
		if !ok {
			return fmt.Errorf("qmp %s: %w", command, ErrVMGone)
		}
		if reply.Error != nil {
			return fmt.Errorf("qmp %s: %w", command, reply.Error)
		}
		if out != nil {
			if err := json.Unmarshal(reply.Return, out); err != nil {
				return fmt.Errorf("qmp %s: decode reply: %w", command, err)
			}
		}
		return nil
	case <-ctx.Done():
		q.mu.Lock()
		delete(q.pending, id)
		q.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
}

// sendWithFile writes req in one message that carries f's descriptor.
func (q *QMP) sendWithFile(req any, f *os.File) error {
	uc, ok := q.conn.(*net.UnixConn)
	if !ok {
		return errors.New("passing a file needs a unix socket")
	}
	line, err := json.Marshal(req)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	n, _, err := uc.WriteMsgUnix(line, unix.UnixRights(int(f.Fd())), nil)
	if err == nil && n != len(line) {
		err = io.ErrShortWrite
	}
	return err
}

// Events delivers asynchronous events; it is closed when the connection
// ends. Events are dropped when nobody reads them.
func (q *QMP) Events() <-chan Event { return q.events }

// Done is closed when the connection ends: QEMU exited or closed it.
func (q *QMP) Done() <-chan struct{} { return q.done }

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }

// Status returns the VM's run state ("running", "paused", "shutdown", ...).
func (q *QMP) Status(ctx context.Context) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	err := q.Execute(ctx, "query-status", nil, &st)
	return st.Status, err
}

// BlockStats is what a VM read from and wrote to its drives since QEMU
// started, all drives together.
type BlockStats struct {
	ReadBytes, WriteBytes uint64
	ReadOps, WriteOps     uint64
}

// BlockStats sums the guest's I/O on each drive (query-blockstats: the
// devices' own counters, not their backing layers').
func (q *QMP) BlockStats(ctx context.Context) (BlockStats, error) {
	var devices []struct {
		Stats struct {
			RdBytes      uint64 `json:"rd_bytes"`
			WrBytes      uint64 `json:"wr_bytes"`
			RdOperations uint64 `json:"rd_operations"`
			WrOperations uint64 `json:"wr_operations"`
		} `json:"stats"`
	}
	if err := q.Execute(ctx, "query-blockstats", nil, &devices); err != nil {
		return BlockStats{}, err
	}
	var s BlockStats
	for _, d := range devices {
		s.ReadBytes += d.Stats.RdBytes
		s.WriteBytes += d.Stats.WrBytes
		s.ReadOps += d.Stats.RdOperations
		s.WriteOps += d.Stats.WrOperations
	}
	return s, nil
}
