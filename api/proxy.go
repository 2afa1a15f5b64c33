package api

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alephvm/alephvm/pool"
)

// proxy forwards requests to program VMs, streaming bodies both ways
// (websockets included), and turns failures into the reference's errors.
//
// It is built for the node's one case rather than on
// httputil.ReverseProxy: the request's own goroutine writes the request
// on one of the proxy's kept-alive connections to the program and reads
// the answer itself; no goroutine, timer or context is made per request
// (see watchdog), copy buffers are pooled, and requests are written from
// the client's headers without copying them. See docs/load.md.
type proxy struct {
	log      *slog.Logger
	conns    *upstreams
	watchdog *watchdog
	bufs     sync.Pool // *[]byte of copyBufferSize
	xs       sync.Pool // *exchange
}

const copyBufferSize = 32 << 10

func newProxy(log *slog.Logger) *proxy {
	p := &proxy{log: log, conns: newUpstreams(), watchdog: &watchdog{tick: 50 * time.Millisecond}}
	p.bufs.New = func() any { b := make([]byte, copyBufferSize); return &b }
	p.xs.New = func() any { return new(exchange) }
	return p
}

var (
	// errProgramTimeout marks a program that sent no response headers
	// within its resources.seconds.
	errProgramTimeout = errors.New("program did not respond within resources.seconds")
	// errClientLeft marks a request whose client went away.
	errClientLeft = errors.New("the client left")
)

func (p *proxy) serve(w http.ResponseWriter, r *http.Request, lease *pool.Lease, path string) {
	if _, err := url.PathUnescape(path); err != nil {
		writeError(w, http.StatusBadRequest, "Invalid path")
		return
	}
	plan := lease.Plan()
	x := p.xs.Get().(*exchange)
	x.ctx = r.Context()
	x.reason.Store(notAborted)
	x.up.Store(nil)
	var deadline time.Time
	if plan.Timeout > 0 {
		deadline = time.Now().Add(plan.Timeout)
		x.deadline.Store(deadline.UnixNano())
	} else {
		x.deadline.Store(0)
	}
	p.watchdog.watch(x)
	ex := &forward{p: p, x: x, w: w, r: r, plan: plan, path: path}
	defer ex.end()
	if err := ex.run(lease.Program(), deadline); err != nil {
		p.writeError(w, r, plan, err)
	}
}

// forward is one request on its way to a program and back.
type forward struct {
	p    *proxy
	x    *exchange
	w    http.ResponseWriter
	r    *http.Request
	plan *pool.Plan
	path string

	up       *upstreamConn
	reusable bool
	// bodyDone gives the result of writing the request's body, when it has
	// one: it is written by a goroutine of its own, so that a program may
	// answer while it reads.
	bodyDone  chan error
	bodyState atomic.Int32
	bodyErr   error
}

// run forwards the request; an error returned is answered to the client,
// which has been sent nothing yet.
func (f *forward) run(prog pool.Program, deadline time.Time) error {
	r := f.r
	hasBody := r.ContentLength != 0
	upgrade := upgradeType(r.Header)
	var resp *http.Response
	for attempt := 0; ; attempt++ {
		up, reused, err := f.p.conns.get(r.Context(), prog, deadline)
		if err != nil {
			return f.failure(err)
		}
		f.up = up
		f.x.setConn(up)
		writeRequestHead(up.bw, r, up.prefix+f.path, upgrade)
		if hasBody {
			f.bodyDone = make(chan error, 1)
			go func() { f.bodyDone <- f.writeBody() }()
		} else {
			err = up.bw.Flush()
		}
		wrote := err == nil
		if err == nil {
			resp, err = readResponse(up.br, r)
		}
		if err == nil {
			break
		}
		if body := f.waitBody(); body != nil {
			err = body
		}
		up.conn.Close()
		f.up = nil
		if attempt == 0 && reused && !hasBody && !up.received && f.x.reason.Load() == notAborted &&
			(!wrote || idempotent(r)) {
			continue // the program had closed the idle connection
		}
		return f.failure(err)
	}
	f.x.deadline.Store(0)
	if f.x.reason.Load() != notAborted {
		resp.Body.Close()
		return f.failure(nil)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return f.switchProtocols(resp, upgrade)
	}

	h := f.w.Header()
	copyHeaders(h, resp.Header)
	f.setProgramHeaders(h)
	if len(resp.Trailer) > 0 {
		keys := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		h["Trailer"] = []string{strings.Join(keys, ", ")}
	}
	f.w.WriteHeader(resp.StatusCode)
	err := f.copyBody(resp)
	if err == nil {
		for k, vv := range resp.Trailer {
			h[http.TrailerPrefix+k] = vv
		}
		f.reusable = !resp.Close
		return nil
	}
	if errors.Is(err, errClientLeft) || r.Context().Err() != nil {
		return nil
	}
	// The program failed in the middle of its answer: the client must not
	// take what it got for a whole answer. As ReverseProxy does, the
	// server is told to abort the response.
	f.p.log.Warn("program's answer cut", "ref", f.plan.Ref, "err", err)
	f.end()
	panic(http.ErrAbortHandler)
}

// failure is the error to answer for err, the watchdog's reason first.
func (f *forward) failure(err error) error {
	if f.x.reason.Load() == notAborted && f.r.Context().Err() != nil {
		return errClientLeft
	}
	if why := f.x.failure(nil); why != nil {
		return why
	}
	var tooLarge *http.MaxBytesError
	if errors.As(f.bodyErr, &tooLarge) {
		return f.bodyErr
	}
	return err
}

// end stops the watchdog watching, finishes the body's writing, and puts
// the connection back for the next request if it can serve one.
func (f *forward) end() {
	if f.x == nil {
		return
	}
	f.p.watchdog.unwatch(f.x)
	aborted := f.x.reason.Load() != notAborted
	f.x.ctx = nil
	f.x.up.Store(nil)
	f.p.xs.Put(f.x)
	f.x = nil
	if f.up == nil {
		return
	}
	if f.waitBody() != nil || aborted {
		f.reusable = false
	}
	if f.reusable {
		f.p.conns.put(f.up)
	} else {
		f.up.conn.Close()
	}
	f.up = nil
}

// waitBody returns the error of writing the request's body. If the
// writing still goes on, the program answered before the body ended:
// either the body's last bytes are being written (the writing is given
// bodyGrace to end, and the connection stays reusable), or the client
// still sends it and the program will not read it (the writing is ended,
// and so is the connection).
func (f *forward) waitBody() error {
	if f.bodyDone == nil {
		return f.bodyErr
	}
	select {
	case f.bodyErr = <-f.bodyDone:
	default:
		if f.bodyState.Load() == bodyReading {
			f.reusable = false
			f.up.conn.Close()
			_ = http.NewResponseController(f.w).SetReadDeadline(aLongTimeAgo)
		} else {
			_ = f.up.conn.SetWriteDeadline(time.Now().Add(bodyGrace))
		}
		f.bodyErr = <-f.bodyDone
		_ = f.up.conn.SetWriteDeadline(time.Time{})
		if f.bodyErr == nil && f.bodyState.Load() != bodySent {
			f.bodyErr = errors.New("request body not all sent")
		}
	}
	f.bodyDone = nil
	return f.bodyErr
}

// Where the writing of a request's body is.
const (
	bodyReading int32 = iota // from the client
	bodyWriting              // to the program
	bodySent
)

// bodyGrace bounds the writing of a body's last bytes once the program
// has answered.
const bodyGrace = 5 * time.Second

// writeBody sends the request's body after its head, as the client sends
// it: each piece read is written at once.
func (f *forward) writeBody() error {
	bw := f.up.bw
	buf := f.p.getBuffer()
	defer f.p.bufs.Put(buf)
	var dst io.Writer = bw
	var chunked io.WriteCloser
	if f.r.ContentLength < 0 {
		chunked = httputil.NewChunkedWriter(bw)
		dst = chunked
	}
	var sent int64
	for {
		f.bodyState.Store(bodyReading)
		n, rerr := f.r.Body.Read(*buf)
		f.bodyState.Store(bodyWriting)
		if n > 0 {
			sent += int64(n)
			if _, err := dst.Write((*buf)[:n]); err != nil {
				return fmt.Errorf("send request body: %w", err)
			}
			if err := bw.Flush(); err != nil {
				return fmt.Errorf("send request body: %w", err)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			// The program waits for the rest of a body that will not
			// come: its connection is ended, which ends the wait for its
			// answer too.
			_ = f.up.conn.SetDeadline(aLongTimeAgo)
			return rerr
		}
	}
	if chunked != nil {
		chunked.Close()
		bw.WriteString("\r\n")
	} else if sent != f.r.ContentLength {
		return fmt.Errorf("request body: %d bytes of %d: %w", sent, f.r.ContentLength, io.ErrUnexpectedEOF)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("send request body: %w", err)
	}
	f.bodyState.Store(bodySent)
	return nil
}

// copyBody sends the answer's body to the client: responses of unknown
// length and event streams are flushed as the program writes them, the
// others are written in as few writes as the server can.
func (f *forward) copyBody(resp *http.Response) error {
	streamed := resp.ContentLength < 0 || isEventStream(resp.Header)
	var rc *http.ResponseController
	if streamed {
		rc = http.NewResponseController(f.w)
	}
	buf := f.p.getBuffer()
	defer f.p.bufs.Put(buf)
	for {
		n, rerr := resp.Body.Read(*buf)
		if n > 0 {
			if _, err := f.w.Write((*buf)[:n]); err != nil {
				return errClientLeft
			}
			if rc != nil {
				if err := rc.Flush(); err != nil {
					return errClientLeft
				}
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			if f.x != nil && f.x.reason.Load() == abortedClientLeft {
				return errClientLeft
			}
			return fmt.Errorf("read the answer: %w", rerr)
		}
	}
}

// switchProtocols serves a websocket (or another upgrade): the program's
// 101 is sent on the client's connection, taken from the server, and
// bytes are then copied both ways until either side closes.
func (f *forward) switchProtocols(resp *http.Response, requested string) error {
	if requested == "" || !strings.EqualFold(upgradeType(resp.Header), requested) {
		return fmt.Errorf("program switched to protocol %q when %q was asked", upgradeType(resp.Header), requested)
	}
	if err := f.waitBody(); err != nil {
		return err
	}
	h := f.w.Header()
	copyHeaders(h, resp.Header)
	f.setProgramHeaders(h)
	h["Connection"] = []string{"Upgrade"}
	h["Upgrade"] = []string{requested}
	client, brw, err := http.NewResponseController(f.w).Hijack()
	if err != nil {
		return fmt.Errorf("take over the client's connection: %w", err)
	}
	up := f.up
	f.up = nil // the connection is the websocket's now
	f.end()
	defer client.Close()
	defer up.conn.Close()
	_ = client.SetDeadline(time.Time{})
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	h.Write(brw)
	brw.WriteString("\r\n")
	if err := brw.Flush(); err != nil {
		return nil
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.p.copyConn(up.conn, brw.Reader)
		up.conn.Close()
		client.Close()
	}()
	f.p.copyConn(client, up.br)
	client.Close()
	up.conn.Close()
	<-done
	return nil
}

// copyConn copies src to dst until either fails.
func (p *proxy) copyConn(dst net.Conn, src *bufio.Reader) {
	buf := p.getBuffer()
	defer p.bufs.Put(buf)
	_, _ = io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *buf)
}

// writerOnly and readerOnly hide ReadFrom and WriteTo, which would copy
// through buffers of their own.
type (
	writerOnly struct{ io.Writer }
	readerOnly struct{ io.Reader }
)

func (p *proxy) getBuffer() *[]byte { return p.bufs.Get().(*[]byte) }

func (f *forward) setProgramHeaders(h http.Header) {
	h["Aleph-Program-Itemhash"] = []string{string(f.plan.Ref)}
	if f.plan.CodeRef != "" {
		h["Aleph-Program-Code-Ref"] = []string{string(f.plan.CodeRef)}
	}
}

func (p *proxy) writeError(w http.ResponseWriter, r *http.Request, plan *pool.Plan, err error) {
	var tooLarge *http.MaxBytesError
	switch {
	case errors.Is(err, errProgramTimeout):
		writeError(w, http.StatusGatewayTimeout, "Program did not respond within resources.seconds")
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "Request body is larger than the node accepts")
	case errors.Is(err, errClientLeft):
	default:
		p.log.Warn("program did not answer", "ref", plan.Ref, "err", err)
		writeError(w, http.StatusBadGateway, "VM did not respond: "+err.Error())
	}
}

// readResponse reads the program's answer to r; interim answers (100
// Continue, 103 Early Hints) are passed over.
func readResponse(br *bufio.Reader, r *http.Request) (*http.Response, error) {
	for {
		resp, err := http.ReadResponse(br, r)
		if err != nil {
			return nil, fmt.Errorf("read the answer's headers: %w", err)
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			return resp, nil
		}
	}
}

// writeRequestHead writes r's request line and headers for the program:
// the client's headers but the hop-by-hop ones (RFC 9110 section 7.6.1),
// the X-Forwarded ones the node sets, and the framing of the body.
func writeRequestHead(bw *bufio.Writer, r *http.Request, path, upgrade string) {
	bw.WriteString(r.Method)
	bw.WriteByte(' ')
	bw.WriteString(path)
	if r.URL.RawQuery != "" || r.URL.ForceQuery {
		bw.WriteByte('?')
		bw.WriteString(r.URL.RawQuery)
	}
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(r.Host)
	bw.WriteString("\r\n")
	connection := r.Header["Connection"]
	for k, vv := range r.Header {
		if hopByHop(k) || hasToken(connection, k) {
			continue
		}
		switch k {
		case "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "Content-Length", "Host",
			// The node sends the body at once: a program that would answer
			// 100 Continue has the body already.
			"Expect":
			continue
		}
		for _, v := range vv {
			writeHeaderLine(bw, k, v)
		}
	}
	if hasToken(r.Header["Te"], "trailers") {
		bw.WriteString("Te: trailers\r\n")
	}
	// X-Forwarded-For: the client, after the proxies the client came
	// through (an empty list given by the caller means "do not set").
	prior, had := r.Header["X-Forwarded-For"]
	if !had || prior != nil {
		bw.WriteString("X-Forwarded-For: ")
		for _, p := range prior {
			bw.WriteString(p)
			bw.WriteString(", ")
		}
		ip, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			ip = r.RemoteAddr
		}
		bw.WriteString(ip)
		bw.WriteString("\r\n")
	}
	writeHeaderLine(bw, "X-Forwarded-Host", r.Host)
	if r.TLS != nil {
		bw.WriteString("X-Forwarded-Proto: https\r\n")
	} else {
		bw.WriteString("X-Forwarded-Proto: http\r\n")
	}
	switch {
	case r.ContentLength > 0:
		bw.WriteString("Content-Length: ")
		bw.WriteString(strconv.FormatInt(r.ContentLength, 10))
		bw.WriteString("\r\n")
	case r.ContentLength < 0:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	case r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch:
		bw.WriteString("Content-Length: 0\r\n")
	}
	if upgrade != "" {
		bw.WriteString("Connection: Upgrade\r\nUpgrade: ")
		bw.WriteString(upgrade)
		bw.WriteString("\r\n")
	}
	bw.WriteString("\r\n")
}

func writeHeaderLine(bw *bufio.Writer, k, v string) {
	bw.WriteString(k)
	bw.WriteString(": ")
	bw.WriteString(v)
	bw.WriteString("\r\n")
}

// copyHeaders adds the program's headers to the answer's, but the
// hop-by-hop ones.
func copyHeaders(dst, src http.Header) {
	connection := src["Connection"]
	for k, vv := range src {
		if hopByHop(k) || hasToken(connection, k) {
			continue
		}
		if old, ok := dst[k]; ok {
			dst[k] = append(old, vv...)
		} else {
			dst[k] = vv
		}
	}
}

// hopByHop tells the headers of one connection rather than of the
// message (RFC 9110 section 7.6.1, and the older ones proxies still
// meet), in their canonical form.
func hopByHop(k string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
		"Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// hasToken tells whether the comma-separated values (of a Connection
// header, which makes the headers it names hop-by-hop too) hold token.
func hasToken(values []string, token string) bool {
	for _, v := range values {
		for v != "" {
			var name string
			name, v, _ = strings.Cut(v, ",")
			if name = textproto.TrimString(name); name != "" && strings.EqualFold(name, token) {
				return true
			}
		}
	}
	return false
}

// upgradeType is the protocol h asks to switch to, if its Connection
// header says so.
func upgradeType(h http.Header) string {
	if !hasToken(h["Connection"], "Upgrade") {
		return ""
	}
	return h.Get("Upgrade")
}

// isEventStream tells an answer of type text/event-stream, without
// parsing its parameters.
func isEventStream(h http.Header) bool {
	return isEventStreamType(h.Get("Content-Type"))
}

// isEventStreamType tells whether a Content-Type is text/event-stream.
func isEventStreamType[T string | []byte](ct T) bool {
	const es = "text/event-stream"
	i := 0
	for i < len(ct) && (ct[i] == ' ' || ct[i] == '\t') {
		i++
	}
	if len(ct)-i < len(es) || !strings.EqualFold(string(ct[i:i+len(es)]), es) {
		return false
	}
	for i += len(es); i < len(ct) && (ct[i] == ' ' || ct[i] == '\t'); i++ {
	}
	return i == len(ct) || ct[i] == ';'
}

// idempotent tells a request that may be sent twice (RFC 9110 section
// 9.2.2), as Go's own transport judges it.
func idempotent(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, key := r.Header["Idempotency-Key"]
	_, xkey := r.Header["X-Idempotency-Key"]
	return key || xkey
}
