package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alephvm/alephvm/message"
)

// Front serves the node's connections. Requests to programs are served
// on the connection's own goroutine by a purpose-built HTTP/1.1 loop (the
// fast path): heads of a strict subset of HTTP/1.1 read in place, the
// request written to a kept-alive connection to the program, the answer
// written back, nothing allocated per request. The first request it does
// not take (any other route, a websocket, a chunked or large body, a head
// outside the subset) hands the connection, with the bytes read so far,
// to net/http (HTTPServer) for the rest of its life; net/http answers it
// exactly as if it had read it first. See docs/load.md.
type Front struct {
	s       *Server
	inner   net.Listener
	handoff chan net.Conn
	log     *slog.Logger

	startOnce sync.Once
	stopped   chan struct{} // closed when Accept has nothing more to give
	err       error         // what Accept returns once stopped

	closing atomic.Bool
	mu      sync.Mutex
	conns   map[*fastConn]struct{}
	serving sync.WaitGroup

	// handed counts the connections given to net/http; noFast (tests)
	// gives them all.
	handed atomic.Int64
	noFast atomic.Bool

	server []byte // the Server header line
	dates  dateCache
	conns0 sync.Pool // *fastConn, with its buffers
}

// Listener bounds ln to the connections the API serves at once and
// serves them: requests to programs on the fast path, the other
// connections given to HTTPServer through Accept.
func (s *Server) Listener(ln net.Listener) *Front {
	l := &clientListener{Listener: ln, done: make(chan struct{})}
	if n := s.opts.Limits.MaxConnections; n > 0 {
		l.slots = make(chan struct{}, n)
	}
	f := &Front{s: s, inner: l, handoff: make(chan net.Conn), log: s.log, stopped: make(chan struct{}),
		conns: map[*fastConn]struct{}{}, server: []byte("Server: aleph-vm/" + s.opts.Version + "\r\n")}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	return f
}

// Accept gives the connections that net/http serves; the first call
// starts accepting.
func (f *Front) Accept() (net.Conn, error) {
	f.startOnce.Do(func() { go f.acceptLoop() })
	select {
	case c := <-f.handoff:
		return c, nil
	case <-f.stopped:
		return nil, f.err
	}
}

func (f *Front) Addr() net.Addr { return f.inner.Addr() }

// Close stops accepting: idle connections of the fast path are closed,
// busy ones once their request is answered (Wait waits for them).
func (f *Front) Close() error {
	f.closing.Store(true)
	err := f.inner.Close()
	f.startOnce.Do(func() { f.err = net.ErrClosed; close(f.stopped) })
	f.mu.Lock()
	for fc := range f.conns {
		if fc.idle.Load() {
			_ = fc.c.SetReadDeadline(aLongTimeAgo)
		}
	}
	f.mu.Unlock()
	return err
}

// Wait waits, after Close, for the fast path's requests in flight to be
// answered.
func (f *Front) Wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() { f.serving.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *Front) acceptLoop() {
	var wait time.Duration
	for {
		c, err := f.inner.Accept()
		if err != nil {
			if f.closing.Load() || errors.Is(err, net.ErrClosed) {
				f.err = err
				close(f.stopped)
				return
			}
			// Out of files, for one: as net/http does, wait and try again.
			wait = min(max(2*wait, 5*time.Millisecond), time.Second)
			f.log.Warn("accept a connection", "err", err, "retry_in", wait)
			time.Sleep(wait)
			continue
		}
		wait = 0
		cc, ok := c.(*clientConn)
		if !ok {
			cc = newClientConn(c, func() {})
		}
		fc := f.newConn(cc)
		go f.serve(fc)
	}
}

// fastConn is a client's connection while the fast path serves it.
type fastConn struct {
	c    *clientConn
	br   *bufio.Reader
	bw   *bufio.Writer
	idle atomic.Bool
	ip   string
	// writeTimeout is the limit of each write of the answer being sent,
	// armedAt when its deadline was last set.
	writeTimeout time.Duration
	armedAt      time.Time
	req          fastRequest
	ans          fastAnswer
	body         io.LimitedReader // of the answer being sent, reused
	// The program of the last request, for the next one on the same
	// route not to decode its name again.
	lastRoute  []byte
	lastByPath bool
	lastRef    message.ItemHash
}

// fastBufferSize is the room for a request's head and body on the fast
// path; bigger ones go to net/http.
const fastBufferSize = 8 << 10

func (f *Front) newConn(c *clientConn) *fastConn {
	fc, _ := f.conns0.Get().(*fastConn)
	if fc == nil {
		fc = &fastConn{br: bufio.NewReaderSize(nil, fastBufferSize), bw: bufio.NewWriterSize(nil, 4<<10)}
	}
	fc.c = c
	fc.br.Reset(fastClientIO{c})
	fc.bw.Reset(fastClientIO{c})
	fc.ip = c.RemoteAddr().String()
	if ip, _, err := net.SplitHostPort(fc.ip); err == nil {
		fc.ip = ip
	}
	f.mu.Lock()
	f.conns[fc] = struct{}{}
	f.serving.Add(1)
	f.mu.Unlock()
	return fc
}

func (f *Front) serve(fc *fastConn) {
	handed := f.serveFast(fc)
	if !handed {
		fc.c.Close()
	}
	f.mu.Lock()
	delete(f.conns, fc)
	f.mu.Unlock()
	f.serving.Done()
	fc.c = nil
	fc.br.Reset(nil)
	fc.bw.Reset(nil)
	fc.lastRoute, fc.lastRef = fc.lastRoute[:0], ""
	f.conns0.Put(fc)
}

// serveFast serves fc's requests until it closes or one is not for the
// fast path; true means the connection was given to net/http.
func (f *Front) serveFast(fc *fastConn) (handed bool) {
	lim := f.s.opts.Limits
	headerTimeout := lim.ReadHeaderTimeout
	if headerTimeout == 0 {
		headerTimeout = lim.ReadTimeout
	}
	idleTimeout := lim.IdleTimeout
	if idleTimeout == 0 {
		idleTimeout = lim.ReadTimeout
	}
	for first := true; ; first = false {
		fc.idle.Store(true)
		if f.closing.Load() {
			return false
		}
		if !first && fc.br.Buffered() == 0 {
			setDeadline(fc.c.SetReadDeadline, idleTimeout)
			if _, err := fc.br.Peek(1); err != nil {
				return false
			}
		}
		fc.idle.Store(false)
		// A head read whole with its first bytes (most are) needs no
		// deadline of its own.
		head := fc.bufferedHead()
		if head == nil {
			var headDeadline time.Time
			if headerTimeout > 0 {
				headDeadline = time.Now().Add(headerTimeout)
			}
			_ = fc.c.SetReadDeadline(headDeadline)
			var err error
			if head, err = fc.readHead(); err != nil {
				if fc.br.Buffered() > 0 {
					// A part of a head, then the end or the deadline: net/http
					// answers it as it does, within the same deadline.
					return f.handOffBy(fc, headDeadline)
				}
				return false
			}
		}
		if head == nil || f.noFast.Load() || !parseRequestHead(head, &fc.req) {
			return f.handOff(fc)
		}
		ref, suffix, ok := f.route(fc)
		if !ok {
			return f.handOff(fc)
		}
		n := len(head) + int(fc.req.contentLength)
		if fc.req.contentLength > int64(fc.br.Size()) || n > fc.br.Size() ||
			(f.s.opts.MaxBodyBytes > 0 && fc.req.contentLength > f.s.opts.MaxBodyBytes) {
			return f.handOff(fc)
		}
		if fc.br.Buffered() < n {
			// The rest of a small body: it streams, as a program's body does
			// on net/http, with no read deadline. Reading it may move the
			// head in the buffer: it is read again.
			_ = fc.c.SetReadDeadline(time.Time{})
			if _, err := fc.br.Peek(n); err != nil {
				return false
			}
			head, _ = fc.br.Peek(len(head))
			parseRequestHead(head, &fc.req)
			ref, suffix, _ = f.route(fc)
		}
		buf, _ := fc.br.Peek(n)
		keep := f.forward(fc, ref, suffix, buf[len(head):])
		if _, err := fc.br.Discard(n); err != nil || !keep || fc.req.close {
			return false
		}
	}
}

// bufferedHead returns the request's head if it is all in the buffer.
func (fc *fastConn) bufferedHead() []byte {
	buf, _ := fc.br.Peek(fc.br.Buffered())
	if i := bytes.Index(buf, crlfcrlf); i >= 0 {
		return buf[:i+4]
	}
	return nil
}

// readHead returns the request's head, read in place; nil when it does
// not fit the buffer.
func (fc *fastConn) readHead() ([]byte, error) {
	for {
		if head := fc.bufferedHead(); head != nil {
			return head, nil
		}
		buf, _ := fc.br.Peek(fc.br.Buffered())
		if len(buf) == fc.br.Size() {
			return nil, nil
		}
		if _, err := fc.br.Peek(len(buf) + 1); err != nil {
			return nil, err
		}
	}
}

var crlfcrlf = []byte("\r\n\r\n")

// route finds the program a request of the fast subset is for: the
// /vm/<ref> routes, and the program host names (handleHost); false for
// every other request, which net/http serves.
func (f *Front) route(fc *fastConn) (message.ItemHash, []byte, bool) {
	if f.s.opts.Programs == nil {
		return "", nil, false
	}
	path := fc.req.path
	var key, suffix []byte
	byPath := bytes.HasPrefix(path, []byte("/vm/"))
	if byPath {
		rest := path[len("/vm/"):]
		end := bytes.IndexByte(rest, '/')
		if end < 0 {
			end = len(rest)
		}
		key, suffix = rest[:end], rest[end:]
	} else {
		key, suffix = fc.req.host, path
	}
	if len(fc.lastRoute) > 0 && fc.lastByPath == byPath && bytes.Equal(key, fc.lastRoute) {
		return fc.lastRef, suffix, true
	}
	var ref message.ItemHash
	var ok bool
	if byPath {
		ref, ok = parseRef(string(key))
	} else {
		ref, ok = f.s.programOfHost(string(key))
	}
	if !ok {
		return "", nil, false
	}
	fc.lastRoute, fc.lastByPath, fc.lastRef = append(fc.lastRoute[:0], key...), byPath, ref
	return ref, suffix, true
}

// handOff gives fc's connection, with what was read of it, to net/http.
func (f *Front) handOff(fc *fastConn) bool { return f.handOffBy(fc, time.Time{}) }

// handOffBy is handOff for a request whose head must be read by deadline
// (zero for net/http's own).
func (f *Front) handOffBy(fc *fastConn, deadline time.Time) bool {
	buffered, _ := fc.br.Peek(fc.br.Buffered())
	hc := &handedConn{clientConn: fc.c, pending: bytes.Clone(buffered), headDeadline: deadline}
	_ = fc.c.SetWriteDeadline(time.Time{})
	_ = fc.c.SetReadDeadline(deadline)
	fc.c.stream(false, 0)
	f.handed.Add(1)
	select {
	case f.handoff <- hc:
		return true
	case <-f.stopped:
		return false
	}
}

// handedConn is a connection given to net/http: what the fast path read
// of it is read first.
type handedConn struct {
	*clientConn
	pending []byte
	// headDeadline, when set, bounds net/http's first read deadline (that
	// of the head it reads again).
	headDeadline time.Time
	deadlineSet  bool
}

func (h *handedConn) SetReadDeadline(t time.Time) error {
	if !h.deadlineSet {
		h.deadlineSet = true
		if !h.headDeadline.IsZero() && (t.IsZero() || t.After(h.headDeadline)) {
			t = h.headDeadline
		}
	}
	return h.clientConn.SetReadDeadline(t)
}

func (h *handedConn) Read(p []byte) (int, error) {
	if len(h.pending) > 0 {
		n := copy(p, h.pending)
		h.pending = h.pending[n:]
		return n, nil
	}
	return h.clientConn.Read(p)
}

func setDeadline(set func(time.Time) error, d time.Duration) {
	if d > 0 {
		_ = set(time.Now().Add(d))
	} else {
		_ = set(time.Time{})
	}
}

// dateCache gives the Date header line of the current second.
type dateCache struct {
	v atomic.Pointer[dateLine]
}

type dateLine struct {
	sec  int64
	line []byte
}

func (d *dateCache) line(now time.Time) []byte {
	sec := now.Unix()
	if l := d.v.Load(); l != nil && l.sec == sec {
		return l.line
	}
	l := &dateLine{sec: sec, line: []byte("Date: " + now.UTC().Format(http.TimeFormat) + "\r\n")}
	d.v.Store(l)
	return l.line
}

// bufferedAnswer is an answer the node makes itself on the fast path (an
// error), written by the same functions as on net/http.
type bufferedAnswer struct {
	h    http.Header
	code int
	body bytes.Buffer
}

func (b *bufferedAnswer) Header() http.Header { return b.h }
func (b *bufferedAnswer) WriteHeader(code int) {
	if b.code == 0 {
		b.code = code
	}
}

func (b *bufferedAnswer) Write(p []byte) (int, error) {
	b.WriteHeader(http.StatusOK)
	return b.body.Write(p)
}

// writeBuffered sends b to the client; false when the connection must end.
func (f *Front) writeBuffered(fc *fastConn, b *bufferedAnswer, head bool) bool {
	if b.code == 0 {
		b.code = http.StatusOK
	}
	bw := fc.bw
	f.armWrite(fc)
	bw.Write(appendStatusLine(bw.AvailableBuffer(), b.code))
	bw.Write(f.server)
	for k, vv := range b.h {
		for _, v := range vv {
			writeHeaderLine(bw, k, v)
		}
	}
	bw.Write(f.dates.line(time.Now()))
	bw.Write(strconv.AppendInt(append(bw.AvailableBuffer(), "Content-Length: "...), int64(b.body.Len()), 10))
	bw.WriteString("\r\n")
	if fc.req.close {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
	if !head {
		bw.Write(b.body.Bytes())
	}
	return bw.Flush() == nil
}

// armWrite starts the write timeout of an answer: each write must make
// progress within it (clientConn).
func (f *Front) armWrite(fc *fastConn) {
	fc.writeTimeout = f.s.opts.Limits.WriteTimeout
	fc.c.stream(true, fc.writeTimeout)
	fc.armedAt = time.Now()
	if fc.writeTimeout > 0 {
		_ = fc.c.SetWriteDeadline(fc.armedAt.Add(fc.writeTimeout))
	} else {
		_ = fc.c.SetWriteDeadline(time.Time{})
	}
}

// rearm gives the next write of an answer the write timeout, as
// deadlineWriter does on net/http; a deadline set less than a quarter of
// the timeout ago is kept, to save the call.
func (fc *fastConn) rearm() {
	if fc.writeTimeout <= 0 {
		return
	}
	if now := time.Now(); now.Sub(fc.armedAt) > fc.writeTimeout/4 {
		fc.armedAt = now
		_ = fc.c.SetWriteDeadline(now.Add(fc.writeTimeout))
	}
}
