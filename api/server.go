package api

import (
	"net"
	"net/http"
	"strings"
	"time"

	"golang.org/x/net/netutil"
)

// Limits bound the node's HTTP server against slow and numerous clients.
// Program requests and logs websockets stream for as long as they last:
// only the header timeout and the connection limit apply to them.
type Limits struct {
	// ReadHeaderTimeout bounds reading a request's headers.
	ReadHeaderTimeout time.Duration
	// ReadTimeout bounds reading a whole request, body included, on the
	// routes that do not stream.
	ReadTimeout time.Duration
	// WriteTimeout bounds writing a response that does not stream, from its
	// first byte: the work before it (an allocation that starts VMs) is not
	// counted.
	WriteTimeout time.Duration
	// IdleTimeout closes a kept-alive connection that sends no new request.
	IdleTimeout time.Duration
	// MaxConnections bounds the connections served at once; more wait to
	// be accepted. 0 means no limit.
	MaxConnections int
}

// HTTPServer returns the http.Server of the API, with its limits.
func (s *Server) HTTPServer() *http.Server {
	l := s.opts.Limits
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		ReadTimeout:       l.ReadTimeout,
		IdleTimeout:       l.IdleTimeout,
	}
}

// Listener bounds ln to the connections the API serves at once.
func (s *Server) Listener(ln net.Listener) net.Listener {
	if n := s.opts.Limits.MaxConnections; n > 0 {
		return netutil.LimitListener(ln, n)
	}
	return ln
}

// deadlineWriter sets the write deadline of a response that does not
// stream when its first byte is written.
type deadlineWriter struct {
	http.ResponseWriter
	timeout   time.Duration
	armed     bool
	streaming bool
}

func (d *deadlineWriter) arm() {
	if !d.armed && !d.streaming && d.timeout > 0 {
		_ = http.NewResponseController(d.ResponseWriter).SetWriteDeadline(time.Now().Add(d.timeout))
	}
	d.armed = true
}

func (d *deadlineWriter) WriteHeader(code int) {
	d.arm()
	d.ResponseWriter.WriteHeader(code)
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.arm()
	return d.ResponseWriter.Write(p)
}

// Unwrap gives http.ResponseController (flushes, hijacks, deadlines) the
// server's own writer.
func (d *deadlineWriter) Unwrap() http.ResponseWriter { return d.ResponseWriter }

// limitBody bounds r's body to n bytes. Past them a read fails with an
// *http.MaxBytesError, and the server, told so through its own writer
// (not a wrapper), closes the connection gracefully: a client still
// sending the rest of its body then reads the answer (413) instead of
// losing it to a reset.
func limitBody(w http.ResponseWriter, r *http.Request, n int64) {
	if d, ok := deadlineOf(w); ok {
		w = d.ResponseWriter
	}
	r.Body = http.MaxBytesReader(w, r.Body, n)
}

// refuseBody is for a body refused for its announced length: one byte of
// it read past a limit of nothing tells the server to close gracefully, as
// limitBody does. The read waits refuseWait at most: a client that sends
// nothing (one that waits for "100 Continue" is not even asked) gets its
// answer all the same.
func refuseBody(w http.ResponseWriter, r *http.Request) {
	if strings.EqualFold(r.Header.Get("Expect"), "100-continue") {
		return
	}
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(refuseWait))
	limitBody(w, r, 0)
	_, _ = r.Body.Read(make([]byte, 1))
}

const refuseWait = 200 * time.Millisecond

// streaming lifts the read and write deadlines of a request that streams
// (a program's, a logs websocket): it lasts as long as it needs.
func streaming(w http.ResponseWriter) {
	if d, ok := deadlineOf(w); ok {
		d.streaming = true
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
}
