package api

import (
	"context"
	"net/http"
	"strings"
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

// handleLogs streams a VM's output over a websocket, past lines first; a
// plain GET gets the past lines as a JSON array.
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
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return
	}
	defer c.CloseNow()
	ctx := c.CloseRead(r.Context())
	found, ended, err := s.opts.Logs.Follow(ctx, ref, func(l LogLine) error {
		return wsjson.Write(ctx, c, logMessage{Type: l.Stream, Message: l.Text})
	})
	switch {
	case err != nil:
		return
	case !found:
		_ = wsjson.Write(ctx, c, logMessage{Type: "system", Message: "No virtual machine with ref " + string(ref)})
	case ended:
		_ = wsjson.Write(ctx, c, logMessage{Type: "system", Message: "VM is not running, past logs sent"})
	}
	c.Close(websocket.StatusNormalClosure, "")
}

func (s *Server) pastLogs(w http.ResponseWriter, r *http.Request, ref message.ItemHash) {
	type entry struct {
		Identifier string    `json:"SYSLOG_IDENTIFIER"`
		Stream     string    `json:"file"`
		Message    string    `json:"MESSAGE"`
		Timestamp  string    `json:"__REALTIME_TIMESTAMP"`
		Time       time.Time `json:"time"`
	}
	lines := []entry{}
	// A context that is already done makes Follow return after the past
	// lines.
	done, cancel := context.WithCancel(r.Context())
	cancel()
	found, _, _ := s.opts.Logs.Follow(done, ref, func(l LogLine) error {
		stream := referenceStream(l.Stream)
		lines = append(lines, entry{Identifier: "vm-" + string(ref) + "-" + stream, Stream: stream, Message: l.Text,
			Timestamp: l.Time.UTC().Format("2006-01-02 15:04:05.000000"), Time: l.Time})
		return nil
	})
	if !found {
		writeError(w, http.StatusNotFound, "No virtual machine with ref "+string(ref))
		return
	}
	writeJSON(w, http.StatusOK, lines)
}
