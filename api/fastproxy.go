package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"time"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// forward serves a request of the fast path: it leases the program
// (booting it if needed), forwards the request and writes the answer.
// False means the client's connection must end.
func (f *Front) forward(fc *fastConn, ref message.ItemHash, suffix, body []byte) bool {
	start := time.Now()
	code := 0
	if obs := f.s.opts.Observer; obs != nil {
		defer func() { obs.ProgramRequest(code, time.Since(start)) }()
	}
	lease, err := f.s.acquire(context.Background(), fc.c, ref)
	if errors.Is(err, errClientLeft) {
		code = 499
		return false
	}
	if err != nil {
		b := &bufferedAnswer{h: http.Header{}}
		f.s.writeStartError(b, ref, err)
		code = b.code
		return f.writeBuffered(fc, b, fc.isHead())
	}
	defer lease.Release()
	var keep bool
	// The program's time (resources.seconds) starts once it runs, as on
	// net/http's path: a boot, a queue behind other boots, is not its.
	keep, code = f.s.proxy.fast(f, fc, lease, suffix, body, time.Now())
	return keep
}

func (fc *fastConn) isHead() bool { return string(fc.req.method) == http.MethodHead }

// fast forwards fc's request to the leased program and writes its answer:
// the status answered (499 when the client left first) and whether the
// client's connection may serve another request.
func (p *proxy) fast(f *Front, fc *fastConn, lease *pool.Lease, suffix, body []byte, start time.Time) (keep bool, code int) {
	plan := lease.Plan()
	x := p.xs.Get().(*exchange)
	x.ctx, x.client, x.since, x.probed = nil, fc.c, start.UnixNano(), 0
	x.reason.Store(notAborted)
	x.up.Store(nil)
	var deadline time.Time
	if plan.Timeout > 0 {
		deadline = start.Add(plan.Timeout)
		x.deadline.Store(deadline.UnixNano())
	} else {
		x.deadline.Store(0)
	}
	p.watchdog.watch(x)
	up, resp, err := p.fastExchange(fc, x, lease.Program(), deadline, suffix, body)
	x.deadline.Store(0)
	if err == nil {
		if why := x.failure(nil); why != nil {
			err = why
			up.conn.Close()
			up = nil
		}
	}
	if err != nil {
		p.watchdog.unwatch(x)
		p.putExchange(x)
		if errors.Is(err, errClientLeft) {
			return false, 499
		}
		b := &bufferedAnswer{h: http.Header{}}
		p.writeError(b, nil, plan, err)
		return f.writeBuffered(fc, b, fc.isHead()), b.code
	}
	var reusable bool
	code = fc.ans.code
	if resp != nil {
		code = resp.StatusCode
		keep, reusable = p.writeResponse(f, fc, plan, up, resp)
	} else {
		keep, reusable = p.writeAnswer(f, fc, plan, up)
	}
	p.watchdog.unwatch(x)
	if x.reason.Load() != notAborted {
		reusable = false
	}
	p.putExchange(x)
	// The body is closed once read whole, or after its connection: closing
	// it would read the rest, which may never end.
	if reusable && up.br.Buffered() == 0 {
		if resp != nil {
			resp.Body.Close()
		}
		p.conns.put(up)
	} else {
		up.conn.Close()
		if resp != nil {
			resp.Body.Close()
		}
	}
	return keep, code
}

func (p *proxy) putExchange(x *exchange) {
	x.ctx, x.client = nil, nil
	x.up.Store(nil)
	p.xs.Put(x)
}

// fastExchange writes the request on a connection to prog and reads the
// answer's head: in fc.ans when it is of the fast subset (resp nil), else
// as an *http.Response.
func (p *proxy) fastExchange(fc *fastConn, x *exchange, prog pool.Program, deadline time.Time, suffix, body []byte) (*upstreamConn, *http.Response, error) {
	r := &fc.req
	for attempt := 0; ; attempt++ {
		up, reused, err := p.conns.get(context.Background(), prog, deadline)
		if err != nil {
			return nil, nil, x.failure(err)
		}
		x.setConn(up)
		up.req = appendFastRequest(up.req[:0], r, up.prefix, suffix, fc.ip, body)
		err = up.send()
		var resp *http.Response
		if err == nil {
			resp, err = readAnswer(up.br, &fc.ans, r.method)
		}
		// The answer's read is done, or the request failed to go: either
		// way sendErr tells whether the request went.
		wrote := up.sendErr == nil
		if !wrote {
			err = up.sendErr
		}
		if err == nil {
			return up, resp, nil
		}
		up.conn.Close()
		if attempt == 0 && reused && len(body) == 0 && !up.received && x.reason.Load() == notAborted &&
			(!wrote || fastIdempotent(r)) {
			continue // the program had closed the idle connection
		}
		return nil, nil, x.failure(err)
	}
}

// readAnswer reads an answer's head from br: parsed in place into a when
// it is of the fast subset (its head is left in br, for writeAnswer),
// else by http.ReadResponse.
func readAnswer(br *bufio.Reader, a *fastAnswer, method []byte) (*http.Response, error) {
	for n := 0; ; {
		buf, err := br.Peek(n + 1)
		if err != nil {
			if len(buf) == 0 || !errors.Is(err, bufio.ErrBufferFull) {
				return nil, fmt.Errorf("read the answer's headers: %w", err)
			}
			break // a head bigger than the buffer
		}
		buf, _ = br.Peek(br.Buffered())
		if i := bytes.Index(buf, crlfcrlf); i >= 0 {
			if parseAnswerHead(buf[:i+4], a) {
				a.headLen = i + 4
				return nil, nil
			}
			break
		}
		n = len(buf)
	}
	resp, err := readResponse(br, &http.Request{Method: string(method)})
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		resp.Body.Close()
		return nil, fmt.Errorf("program switched to protocol %q when none was asked", upgradeType(resp.Header))
	}
	return resp, nil
}

// appendFastRequest appends r for the program to b, as writeRequestHead
// writes a request read by net/http, then its body.
func appendFastRequest(b []byte, r *fastRequest, prefix string, suffix []byte, ip string, body []byte) []byte {
	b = append(b, r.method...)
	b = append(b, ' ')
	b = append(b, prefix...)
	if len(suffix) == 0 {
		b = append(b, '/')
	} else {
		b = append(b, suffix...)
	}
	if r.hasQuery {
		b = append(b, '?')
		b = append(b, r.query...)
	}
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, r.host...)
	b = append(b, "\r\n"...)
	for _, h := range r.headers {
		if hopByHopName(h.name) || namedIn(h.name, r.connTokens) || notForwarded(h.name) {
			continue
		}
		b = append(append(append(append(b, h.name...), ": "...), h.value...), "\r\n"...)
	}
	if r.teTrailers {
		b = append(b, "Te: trailers\r\n"...)
	}
	b = append(b, "X-Forwarded-For: "...)
	if r.hasXFF {
		for _, h := range r.headers {
			if equalFold(h.name, "x-forwarded-for") {
				b = append(append(b, h.value...), ", "...)
			}
		}
	}
	b = append(b, ip...)
	b = append(b, "\r\nX-Forwarded-Host: "...)
	b = append(b, r.host...)
	b = append(b, "\r\nX-Forwarded-Proto: http\r\n"...)
	switch m := string(r.method); {
	case r.contentLength > 0, m == http.MethodPost || m == http.MethodPut || m == http.MethodPatch:
		b = strconv.AppendInt(append(b, "Content-Length: "...), r.contentLength, 10)
		b = append(b, "\r\n"...)
	}
	b = append(b, "\r\n"...)
	return append(b, body...)
}

// notForwarded tells the request headers the node sets itself (or, for
// Expect, answers itself).
func notForwarded(name []byte) bool { return foldIn(name, notForwardedNames) }

var notForwardedNames = []string{"host", "expect", "forwarded", "content-length",
	"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}

func writeSpan(bw *bufio.Writer, h headerSpan) {
	bw.Write(h.name)
	bw.WriteString(": ")
	bw.Write(h.value)
	bw.WriteString("\r\n")
}

// fastIdempotent is idempotent for a request of the fast path.
func fastIdempotent(r *fastRequest) bool {
	switch string(r.method) {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return true
	}
	for _, h := range r.headers {
		if equalFold(h.name, "idempotency-key") || equalFold(h.name, "x-idempotency-key") {
			return true
		}
	}
	return false
}

// bodiless tells an answer that has no body whatever its headers say.
func bodiless(method []byte, code int) bool {
	return string(method) == http.MethodHead || code == http.StatusNoContent || code == http.StatusNotModified
}

// writeAnswerStart writes the status line and the node's own headers.
func (f *Front) writeAnswerStart(fc *fastConn, plan *pool.Plan, code int) {
	bw := fc.bw
	bw.Write(appendStatusLine(bw.AvailableBuffer(), code))
	bw.Write(f.server)
	bw.WriteString("Aleph-Program-Itemhash: ")
	bw.WriteString(string(plan.Ref))
	bw.WriteString("\r\n")
	if plan.CodeRef != "" {
		bw.WriteString("Aleph-Program-Code-Ref: ")
		bw.WriteString(string(plan.CodeRef))
		bw.WriteString("\r\n")
	}
	if fc.req.close {
		bw.WriteString("Connection: close\r\n")
	}
}

// writeAnswer sends an answer of the fast subset, its head still in
// up.br: whether the client's connection may go on, and whether up may
// serve another request.
func (p *proxy) writeAnswer(f *Front, fc *fastConn, plan *pool.Plan, up *upstreamConn) (keep, reusable bool) {
	a := &fc.ans
	bw := fc.bw
	f.armWrite(fc)
	f.writeAnswerStart(fc, plan, a.code)
	noBody := bodiless(fc.req.method, a.code)
	for _, h := range a.headers {
		if hopByHopName(h.name) || namedIn(h.name, a.connTokens) ||
			(noBody && string(fc.req.method) != http.MethodHead && equalFold(h.name, "content-length")) {
			continue
		}
		writeSpan(bw, h)
	}
	if !a.hasDate {
		bw.Write(f.dates.line(time.Now()))
	}
	bw.WriteString("\r\n")
	// The head read in place is written: it may go.
	_, _ = up.br.Discard(a.headLen)
	if noBody || a.contentLength == 0 {
		return bw.Flush() == nil, !a.close
	}
	fc.body = io.LimitedReader{R: up.br, N: a.contentLength}
	n, err := p.copyBody(fc, &fc.body, nil, a.eventStream)
	fc.body.R = nil
	if err == nil && n < a.contentLength {
		err = fmt.Errorf("read the answer: %w", io.ErrUnexpectedEOF)
	}
	if err != nil {
		if !errors.Is(err, errClientLeft) {
			p.log.Warn("program's answer cut", "ref", plan.Ref, "err", err)
		}
		return false, false
	}
	return true, !a.close && !a.eventStream
}

// writeResponse sends an answer read by http.ReadResponse: of unknown
// length (chunked to the client, trailers included), or with a head the
// fast path does not read itself.
func (p *proxy) writeResponse(f *Front, fc *fastConn, plan *pool.Plan, up *upstreamConn, resp *http.Response) (keep, reusable bool) {
	bw := fc.bw
	f.armWrite(fc)
	f.writeAnswerStart(fc, plan, resp.StatusCode)
	connection := resp.Header["Connection"]
	for k, vv := range resp.Header {
		if hopByHop(k) || hasToken(connection, k) || k == "Content-Length" {
			continue
		}
		for _, v := range vv {
			writeHeaderLine(bw, k, v)
		}
	}
	if _, ok := resp.Header["Date"]; !ok {
		bw.Write(f.dates.line(time.Now()))
	}
	noBody := bodiless(fc.req.method, resp.StatusCode)
	chunked := !noBody && resp.ContentLength < 0
	switch {
	case chunked:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
		if len(resp.Trailer) > 0 {
			keys := make([]string, 0, len(resp.Trailer))
			for k := range resp.Trailer {
				keys = append(keys, k)
			}
			writeHeaderLine(bw, "Trailer", strings.Join(keys, ", "))
		}
	case resp.ContentLength >= 0 && (!noBody || string(fc.req.method) == http.MethodHead):
		bw.Write(strconv.AppendInt(append(bw.AvailableBuffer(), "Content-Length: "...), resp.ContentLength, 10))
		bw.WriteString("\r\n")
	}
	bw.WriteString("\r\n")
	if noBody {
		return bw.Flush() == nil, !resp.Close
	}
	var cw io.WriteCloser
	if chunked {
		cw = httputil.NewChunkedWriter(bw)
	}
	_, err := p.copyBody(fc, resp.Body, cw, chunked || isEventStream(resp.Header))
	if err == nil && cw != nil {
		cw.Close()
		for k, vv := range resp.Trailer {
			for _, v := range vv {
				writeHeaderLine(bw, k, v)
			}
		}
		bw.WriteString("\r\n")
		if bw.Flush() != nil {
			err = errClientLeft
		}
	}
	if err != nil {
		if !errors.Is(err, errClientLeft) {
			p.log.Warn("program's answer cut", "ref", plan.Ref, "err", err)
		}
		return false, false
	}
	return true, !resp.Close
}

// copyBody sends src to the client (through cw when it is not nil),
// each piece within the write timeout and, when flush, flushed as it
// comes: streams are not held back. It returns the bytes read from src,
// and errClientLeft when the client's side failed, else src's error (nil
// at its end).
func (p *proxy) copyBody(fc *fastConn, src io.Reader, cw io.Writer, flush bool) (int64, error) {
	var dst io.Writer = fc.bw
	if cw != nil {
		dst = cw
	}
	buf := p.getBuffer()
	defer p.bufs.Put(buf)
	var total int64
	for {
		n, rerr := src.Read(*buf)
		if n > 0 {
			total += int64(n)
			fc.rearm()
			if _, err := dst.Write((*buf)[:n]); err != nil {
				return total, errClientLeft
			}
			if flush && fc.bw.Flush() != nil {
				return total, errClientLeft
			}
		}
		if rerr == io.EOF {
			if !flush {
				fc.rearm()
				if fc.bw.Flush() != nil {
					return total, errClientLeft
				}
			}
			return total, nil
		}
		if rerr != nil {
			return total, fmt.Errorf("read the answer: %w", rerr)
		}
	}
}
