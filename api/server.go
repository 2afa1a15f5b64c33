package api

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Limits bound the node's HTTP server against slow and numerous clients.
// Program requests and logs websockets stream for as long as they last:
// only the header timeout, the connection limit and the write timeout of
// each part of their answers apply to them.
type Limits struct {
	// ReadHeaderTimeout bounds reading a request's headers.
	ReadHeaderTimeout time.Duration
	// ReadTimeout bounds reading a whole request, body included, on the
	// routes that do not stream.
	ReadTimeout time.Duration
	// WriteTimeout bounds writing a response that does not stream, from its
	// first byte: the work before it (an allocation that starts VMs) is not
	// counted. A streamed response (a program's) may last as long as it
	// needs, but each of its writes must be taken within WriteTimeout: a
	// client that stops reading is cut.
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
		ConnContext:       withClientConn,
	}
}

// clientListener accepts at most cap(slots) connections at once (no limit
// without slots): more wait to be accepted until one closes.
type clientListener struct {
	net.Listener
	slots     chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func (l *clientListener) Accept() (net.Conn, error) {
	if l.slots != nil {
		select {
		case l.slots <- struct{}{}:
		case <-l.done:
			return nil, net.ErrClosed
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		l.free()
		return nil, err
	}
	return newClientConn(c, l.free), nil
}

func (l *clientListener) free() {
	if l.slots != nil {
		<-l.slots
	}
}

func (l *clientListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// notSentLowat is the most a client connection queues that is not sent
// yet (TCP_NOTSENT_LOWAT): a slow client holds that much of the node's
// memory, not a send queue of up to 4 MiB (tcp_wmem), and a write blocked
// on it resumes as soon as the client takes what it was sent.
const notSentLowat = 128 << 10

// clientConn is a client's connection. While it carries a streamed
// answer, a write that passes its deadline is given another timeout as
// long as the client took some bytes since the last look (TCP's
// acknowledged bytes, read only when a write times out, not before each
// write): a client reading slowly but steadily, with more in the sockets'
// buffers than it reads within the timeout, is not cut; one that stops
// reading is, within two timeouts.
type clientConn struct {
	net.Conn
	free      func()
	freeOnce  sync.Once
	streaming atomic.Bool
	timeout   atomic.Int64 // of the stream's writes
	// acked is what the client had acknowledged at the last timed-out
	// write, lookedAt whether there was one; used by Write only.
	acked    uint64
	lookedAt bool
	// raw is the socket of a TCP connection (nil else): the fast path's
	// reads and writes (fastClientIO), its options and TCP_INFO.
	raw *rawIO
}

func newClientConn(c net.Conn, free func()) *clientConn {
	cc := &clientConn{Conn: c, free: free}
	if tc, ok := c.(*net.TCPConn); ok {
		cc.raw = newRawIO(tc)
	}
	if cc.raw != nil {
		_ = cc.raw.rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, notSentLowat)
		})
	}
	return cc
}

// stream says whether the connection carries a streamed answer, whose
// writes must each make progress within timeout.
func (c *clientConn) stream(on bool, timeout time.Duration) {
	c.timeout.Store(int64(timeout))
	c.streaming.Store(on)
}

func (c *clientConn) Write(p []byte) (int, error) { return c.writeWith(c.Conn.Write, p) }

// writeWith writes p with write, the conn's own or the fast path's.
func (c *clientConn) writeWith(write func([]byte) (int, error), p []byte) (int, error) {
	n, err := write(p)
	if err == nil || !c.streaming.Load() || c.raw == nil {
		return n, err
	}
	for errors.Is(err, os.ErrDeadlineExceeded) {
		now, ok := c.bytesAcked()
		if !ok || (c.lookedAt && now == c.acked) {
			break
		}
		c.acked, c.lookedAt = now, true
		_ = c.Conn.SetWriteDeadline(time.Now().Add(time.Duration(c.timeout.Load())))
		var m int
		m, err = write(p[n:])
		n += m
	}
	return n, err
}

// bytesAcked is how many bytes the client has acknowledged.
func (c *clientConn) bytesAcked() (uint64, bool) {
	var info *unix.TCPInfo
	var err error
	ctlErr := c.raw.rc.Control(func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	})
	if ctlErr != nil || err != nil {
		return 0, false
	}
	return info.Bytes_acked, true
}

// fastClientIO is a client's connection as the fast path reads and
// writes it: with raw system calls (rawIO), the write timeout kept as
// clientConn.Write keeps it.
type fastClientIO struct{ c *clientConn }

func (f fastClientIO) Read(p []byte) (int, error) {
	if f.c.raw == nil {
		return f.c.Read(p)
	}
	return f.c.raw.Read(p)
}

func (f fastClientIO) Write(p []byte) (int, error) {
	if f.c.raw == nil {
		return f.c.Write(p)
	}
	return f.c.writeWith(f.c.raw.Write, p)
}

// gone tells whether the client closed its side (or reset it), without
// waiting: a request it pipelined after this one keeps it here.
func (c *clientConn) gone() bool {
	_, closed := probe(c.Conn)
	return closed
}

func (c *clientConn) Close() error {
	err := c.Conn.Close()
	c.freeOnce.Do(c.free)
	return err
}

type clientConnKey struct{}

// withClientConn keeps a request's connection in its context, for
// streaming.
func withClientConn(ctx context.Context, c net.Conn) context.Context {
	switch cc := c.(type) {
	case *clientConn:
		return context.WithValue(ctx, clientConnKey{}, cc)
	case *handedConn:
		return context.WithValue(ctx, clientConnKey{}, cc.clientConn)
	}
	return ctx
}

func clientConnOf(r *http.Request) *clientConn {
	cc, _ := r.Context().Value(clientConnKey{}).(*clientConn)
	return cc
}

// deadlineWriter sets the write deadline of a response that does not
// stream when its first byte is written, and that of a streamed response
// before each of its writes and flushes.
type deadlineWriter struct {
	http.ResponseWriter
	conn      *clientConn // nil when not served by Listener
	timeout   time.Duration
	armed     bool
	streaming bool
}

func (d *deadlineWriter) arm() {
	if d.timeout > 0 && (d.streaming || !d.armed) {
		_ = http.NewResponseController(d.ResponseWriter).SetWriteDeadline(time.Now().Add(d.timeout))
	}
	d.armed = true
}

// FlushError flushes what a streamed response wrote, within the write
// timeout (http.ResponseController calls it).
func (d *deadlineWriter) FlushError() error {
	d.arm()
	return http.NewResponseController(d.ResponseWriter).Flush()
}

// finish arms the deadline of the server's last write of a streamed
// response, after its handler: the end of a stream that paused longer
// than the timeout before it ended is still written.
func (d *deadlineWriter) finish() {
	if d.streaming {
		d.arm()
	}
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
		if d.conn != nil {
			d.conn.stream(true, d.timeout)
		}
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
}
