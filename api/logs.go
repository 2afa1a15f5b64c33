package api

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/alephvm/alephvm/message"
)

// LogLine is one line of a VM's output: the workload's stdout or stderr,
// the serial console, or a line of the node's own ("system").
type LogLine struct {
	Time   time.Time
	Stream string
	Text   string
}

// Logs gives the output of VMs.
type Logs interface {
	// Follow calls fn with the VM's past lines, then with each new one, until
	// the VM stops, fn fails or ctx ends. found is false when the node knows
	// no output of ref; ended is true when the VM stopped.
	Follow(ctx context.Context, ref message.ItemHash, fn func(LogLine) error) (found, ended bool, err error)
}

// logMessage is the reference's stream_logs message.
type logMessage struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// Default bounds of the logs websockets open at once; the reference keeps
// about 20 per VM.
const (
	DefaultMaxLogFollowers      = 256
	DefaultMaxLogFollowersPerVM = 20
)

// followers counts the logs websockets open, in all and per VM.
type followers struct {
	max, maxPerVM int
	mu            sync.Mutex
	total         int
	perVM         map[message.ItemHash]int
}

func newFollowers(max, maxPerVM int) *followers {
	if max <= 0 {
		max = DefaultMaxLogFollowers
	}
	if maxPerVM <= 0 {
		maxPerVM = DefaultMaxLogFollowersPerVM
	}
	return &followers{max: max, maxPerVM: maxPerVM, perVM: map[message.ItemHash]int{}}
}

// take counts one more follower of ref, unless a bound is reached; it
// returns the bound's description then.
func (f *followers) take(ref message.ItemHash) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.perVM[ref] >= f.maxPerVM:
		return "Too many clients follow the logs of this VM (at most " + strconv.Itoa(f.maxPerVM) + ")", false
	case f.total >= f.max:
		return "Too many clients follow logs on this node (at most " + strconv.Itoa(f.max) + ")", false
	}
	f.perVM[ref]++
	f.total++
	return "", true
}

func (f *followers) release(ref message.ItemHash) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.total--
	if f.perVM[ref]--; f.perVM[ref] <= 0 {
		delete(f.perVM, ref)
	}
}

// handleLogs streams a VM's output over a websocket, past lines first; a
// plain GET gets the past lines as a JSON array. Both take the VM owner's
// or the operator's credentials, as the other operator routes do.
func (s *Server) handleLogs(w http.ResponseWriter, r *http.Request) {
	ref, _, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	if s.opts.Logs == nil {
		writeError(w, http.StatusNotFound, "No logs on this node")
		return
	}
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		s.pastLogs(w, r, ref)
		return
	}
	why, ok := s.followers.take(ref)
	if !ok {
		w.Header().Set("Retry-After", "10")
		writeError(w, http.StatusTooManyRequests, why)
		return
	}
	// The place is given back as soon as the follower stops following,
	// before the close handshake, which a client may drag out.
	release := sync.OnceFunc(func() { s.followers.release(ref) })
	defer release()
	// A websocket lasts as long as the client follows.
	streaming(w)
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{OriginPatterns: s.opts.WebsocketOrigins})
	if err != nil {
		return // Accept answered: a bad handshake, or 403 for a foreign origin
	}
	defer c.CloseNow()
	c.SetReadLimit(4 << 10) // clients send nothing but control frames
	ctx := readControlFrames(r.Context(), c)
	found, ended, err := s.opts.Logs.Follow(ctx, ref, func(l LogLine) error {
		return s.sendFrame(ctx, c, logMessage{Type: l.Stream, Message: l.Text})
	})
	release()
	switch {
	case err != nil:
		return
	case !found:
		_ = s.sendFrame(ctx, c, logMessage{Type: "system", Message: "No virtual machine with ref " + string(ref)})
	case ended:
		_ = s.sendFrame(ctx, c, logMessage{Type: "system", Message: "VM is not running, past logs sent"})
	}
	c.Close(websocket.StatusNormalClosure, "")
}

// sendFrame writes v as one JSON frame of a logs websocket. A client that
// takes longer than the write timeout to take it is dropped (the library
// closes the connection when the write's context ends): one that stops
// reading would otherwise hold its follower's place, a goroutine and a
// connection for as long as it keeps the connection open.
func (s *Server) sendFrame(ctx context.Context, c *websocket.Conn, v any) error {
	if d := s.opts.Limits.WriteTimeout; d > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	return wsjson.Write(ctx, c, v)
}

// readControlFrames reads what the client of a logs websocket sends, which
// must be nothing but control frames (pings, pongs, its close), and
// returns a context that ends with the connection. A data message closes
// the connection with a policy violation, which ends the context. It stands for coder/websocket's CloseRead,
// which after a data message waits 15 s on itself before it closes the
// connection and ends its context (coder/websocket#429): the handler, its
// follower's place and the connection stayed that long.
func readControlFrames(ctx context.Context, c *websocket.Conn) context.Context {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		defer cancel()
		if _, _, err := c.Read(ctx); err == nil {
			// Closed before the context ends: a write under way on it
			// would drop the connection without a close frame.
			c.Close(websocket.StatusPolicyViolation, "unexpected data message")
		}
	}()
	return ctx
}

// pastLogs answers the past lines as a JSON array, written as they come:
// the node holds one line at a time, whatever the VM's output.
func (s *Server) pastLogs(w http.ResponseWriter, r *http.Request, ref message.ItemHash) {
	type entry struct {
		Identifier string    `json:"SYSLOG_IDENTIFIER"`
		Stream     string    `json:"file"`
		Message    string    `json:"MESSAGE"`
		Timestamp  string    `json:"__REALTIME_TIMESTAMP"`
		Time       time.Time `json:"time"`
	}
	// A context that is already done makes Follow return after the past
	// lines.
	done, cancel := context.WithCancel(r.Context())
	cancel()
	n := 0
	found, _, _ := s.opts.Logs.Follow(done, ref, func(l LogLine) error {
		sep := ","
		if n == 0 {
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.WriteHeader(http.StatusOK)
			sep = "["
		}
		n++
		stream := referenceStream(l.Stream)
		data, err := json.Marshal(entry{Identifier: "vm-" + string(ref) + "-" + stream, Stream: stream, Message: l.Text,
			Timestamp: l.Time.UTC().Format("2006-01-02 15:04:05.000000"), Time: l.Time})
		if err != nil {
			return err
		}
		_, err = w.Write(append([]byte(sep), data...))
		return err
	})
	switch {
	case n > 0:
		_, _ = w.Write([]byte("]\n"))
	case !found:
		writeError(w, http.StatusNotFound, "No virtual machine with ref "+string(ref))
	default:
		writeJSON(w, http.StatusOK, []struct{}{})
	}
}
