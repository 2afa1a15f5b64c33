package api

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/auth"
)

// referenceStream names a line's stream as the reference's journal does:
// a VM's console is its stdout.
func referenceStream(stream string) string {
	switch stream {
	case "stdout", "stderr", "system":
		return stream
	}
	return "stdout"
}

// authTimeout bounds the wait for a stream_logs first frame.
const authTimeout = 30 * time.Second

// handleStreamLogs streams a VM's output to its owner over a websocket, as
// the SDKs' get_logs and streamLogs read it: browsers cannot set headers
// on a websocket, so the first frame carries the owner scheme's
// credentials, {"auth": {"X-SignedPubKey": {...}, "X-SignedOperation":
// {...}}}, signed for GET on this path. The node answers {"status":
// "connected"} and sends {"type": "stdout"|"stderr"|"system", "message"}
// frames, past lines first; or {"status": "failed", "reason"} and closes.
func (s *Server) handleStreamLogs(w http.ResponseWriter, r *http.Request) {
	ref, ok := parseRef(r.PathValue("ref"))
	if !ok {
		writeError(w, http.StatusBadRequest, "Invalid message reference")
		return
	}
	if s.opts.Logs == nil {
		writeError(w, http.StatusNotFound, "No logs on this node")
		return
	}
	m, err := s.machine(r.Context(), ref)
	if err != nil {
		writeError(w, http.StatusNotFound, "No execution found for VM "+string(ref))
		return
	}
	// Any origin may connect (the owner's console is on another site): the
	// credentials are in the first frame, not in a cookie a page could
	// borrow.
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(64 << 10)
	fail := func(ctx context.Context, reason string) {
		_ = s.sendFrame(ctx, c, map[string]string{"status": "failed", "reason": reason})
		c.Close(websocket.StatusNormalClosure, "")
	}
	authCtx, cancel := context.WithTimeout(r.Context(), authTimeout)
	defer cancel()
	_, data, err := c.Read(authCtx)
	if err != nil {
		fail(r.Context(), "no authentication frame: "+err.Error())
		return
	}
	var first struct {
		Auth *auth.Credentials `json:"auth"`
	}
	if err := json.Unmarshal(data, &first); err != nil {
		fail(r.Context(), "Invalid format for auth packet: "+err.Error())
		return
	}
	if first.Auth == nil {
		fail(r.Context(), "missing 'auth' key in message")
		return
	}
	if s.opts.OwnerAuth == nil {
		fail(r.Context(), "This node accepts no owner calls")
		return
	}
	id, err := s.opts.OwnerAuth.VerifyCredentials(r.Context(), *first.Auth, http.MethodGet, r.URL.Path)
	if err != nil {
		fail(r.Context(), err.Error())
		return
	}
	if !s.mayAct(r.Context(), id, ref, m) {
		fail(r.Context(), "unauthorized sender")
		return
	}
	ctx := readControlFrames(r.Context(), c)
	if err := s.sendFrame(ctx, c, map[string]string{"status": "connected"}); err != nil {
		return
	}
	found, ended, err := s.opts.Logs.Follow(ctx, ref, func(l LogLine) error {
		return s.sendFrame(ctx, c, logMessage{Type: referenceStream(l.Stream), Message: l.Text})
	})
	switch {
	case err != nil:
		return
	case !found || ended:
		_ = s.sendFrame(ctx, c, logMessage{Type: "system", Message: "VM is not running, past logs sent"})
	}
	c.Close(websocket.StatusNormalClosure, "")
}
