package api

import (
	"bytes"
	"net/http"
	"strconv"
)

// The fast path (front.go) reads request and answer heads itself, but only
// those of a strict subset of HTTP/1.1 that it understands exactly as
// net/http does: CRLF line ends, tokens for names, printable ASCII values,
// one Host, at most one Content-Length of digits, no Transfer-Encoding,
// no Expect, no upgrade. Any other head is not parsed here: a request goes
// to net/http (which answers or refuses it as before), an answer to
// http.ReadResponse. FuzzRequestHead checks the agreement.

// headerSpan is one header line of a head: name and value, spaces trimmed.
type headerSpan struct {
	name, value []byte
}

// maxFastHeaders bounds the headers of a head the fast path reads; a head
// with more goes the general way.
const maxFastHeaders = 64

// maxConnectionTokens bounds the headers a Connection header may name.
const maxConnectionTokens = 8

// fastRequest is a request head of the fast subset.
type fastRequest struct {
	head          []byte // the whole head, CRLF CRLF included
	method        []byte
	path          []byte // escaped path, from the first '/'
	query         []byte // after '?', nil when there is no '?'
	hasQuery      bool
	host          []byte
	contentLength int64
	close         bool // Connection: close
	teTrailers    bool // TE: trailers
	headers       []headerSpan
	connTokens    [][]byte // headers named by Connection
	hasXFF        bool
}

// reset empties r for the next head, keeping its slices' room.
func (r *fastRequest) reset() {
	headers, tokens := r.headers[:0], r.connTokens[:0]
	*r = fastRequest{headers: headers, connTokens: tokens}
}

// parseRequestHead parses head (ending in CRLF CRLF) into r; false means
// the head is not of the fast subset.
func parseRequestHead(head []byte, r *fastRequest) bool {
	r.reset()
	r.head = head
	line, rest, ok := cutLine(head)
	if !ok {
		return false
	}
	// Request line: METHOD SP origin-form SP HTTP/1.1
	sp := bytes.IndexByte(line, ' ')
	if sp < 1 || sp > 16 {
		return false
	}
	r.method = line[:sp]
	for _, c := range r.method {
		if c < 'A' || c > 'Z' {
			return false
		}
	}
	if !fastMethod(r.method) {
		return false
	}
	line = line[sp+1:]
	sp = bytes.IndexByte(line, ' ')
	if sp < 1 || string(line[sp+1:]) != "HTTP/1.1" {
		return false
	}
	target := line[:sp]
	if target[0] != '/' || !validTarget(target) {
		return false
	}
	if q := bytes.IndexByte(target, '?'); q >= 0 {
		r.path, r.query, r.hasQuery = target[:q], target[q+1:], true
	} else {
		r.path = target
	}
	hosts, lengths := 0, 0
	ok = eachHeader(rest, func(name, value []byte) bool {
		switch {
		case equalFold(name, "host"):
			hosts++
			if !validHost(value) {
				return false
			}
			r.host = value
		case equalFold(name, "content-length"):
			lengths++
			n, ok := parseLength(value)
			if !ok {
				return false
			}
			r.contentLength = n
		case equalFold(name, "transfer-encoding"), equalFold(name, "expect"), equalFold(name, "upgrade"):
			return false
		case equalFold(name, "connection"):
			if !parseConnection(value, &r.close, &r.connTokens) {
				return false
			}
		case equalFold(name, "te"):
			eachToken(value, func(t []byte) bool {
				if equalFold(t, "trailers") {
					r.teTrailers = true
				}
				return true
			})
		case equalFold(name, "x-forwarded-for"):
			r.hasXFF = true
		}
		r.headers = append(r.headers, headerSpan{name, value})
		return true
	})
	return ok && hosts == 1 && lengths <= 1
}

// eachHeader calls fn with each header of a head's lines after the first,
// up to the empty line that must end it; false when a line is not of the
// subset, there are more than maxFastHeaders, or fn refuses one.
func eachHeader(rest []byte, fn func(name, value []byte) bool) bool {
	for n := 0; ; n++ {
		line, next, ok := cutLine(rest)
		if !ok {
			return false
		}
		if len(line) == 0 {
			return len(next) == 0
		}
		name, value, ok := splitHeader(line)
		if !ok || n == maxFastHeaders || !fn(name, value) {
			return false
		}
		rest = next
	}
}

// parseConnection reads a Connection header: close, and the headers it
// names (hop-by-hop too); false for an upgrade or too many names.
func parseConnection(value []byte, close *bool, tokens *[][]byte) bool {
	return eachToken(value, func(t []byte) bool {
		switch {
		case equalFold(t, "close"):
			*close = true
		case equalFold(t, "keep-alive"):
		case equalFold(t, "upgrade"), len(*tokens) == maxConnectionTokens:
			return false
		default:
			*tokens = append(*tokens, t)
		}
		return true
	})
}

// fastMethod tells the methods the fast path forwards; CONNECT and those
// net/http treats apart are not.
func fastMethod(m []byte) bool {
	switch string(m) {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions:
		return true
	}
	return false
}

// fastAnswer is an answer head of the fast subset.
type fastAnswer struct {
	headLen       int // of the head, left in the connection's buffer
	code          int
	contentLength int64 // -1 when the answer has none
	close         bool
	eventStream   bool
	hasDate       bool
	headers       []headerSpan
	connTokens    [][]byte
}

func (a *fastAnswer) reset() {
	headers, tokens := a.headers[:0], a.connTokens[:0]
	*a = fastAnswer{headers: headers, connTokens: tokens, contentLength: -1}
}

// parseAnswerHead parses an answer's head (ending in CRLF CRLF) into a;
// false means it is not of the fast subset: an interim or upgrade
// answer, a body framed otherwise than by one Content-Length (chunked, or
// up to the connection's end), trailers, or anything unusual.
func parseAnswerHead(head []byte, a *fastAnswer) bool {
	a.reset()
	line, rest, ok := cutLine(head)
	if !ok || len(line) < 12 || string(line[:9]) != "HTTP/1.1 " || len(line) > 12 && line[12] != ' ' {
		return false
	}
	code := 0
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return false
		}
		code = code*10 + int(c-'0')
	}
	if code < 200 || code > 599 {
		return false
	}
	for _, c := range line[12:] {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	a.code = code
	lengths := 0
	ok = eachHeader(rest, func(name, value []byte) bool {
		switch {
		case equalFold(name, "content-length"):
			lengths++
			n, ok := parseLength(value)
			if !ok {
				return false
			}
			a.contentLength = n
		case equalFold(name, "transfer-encoding"), equalFold(name, "trailer"), equalFold(name, "upgrade"):
			return false
		case equalFold(name, "connection"):
			if !parseConnection(value, &a.close, &a.connTokens) {
				return false
			}
		case equalFold(name, "content-type"):
			a.eventStream = isEventStreamType(value)
		case equalFold(name, "date"):
			a.hasDate = true
		}
		a.headers = append(a.headers, headerSpan{name, value})
		return true
	})
	if !ok || lengths > 1 {
		return false
	}
	if lengths == 0 && code != http.StatusNoContent && code != http.StatusNotModified {
		return false
	}
	return true
}

// cutLine cuts b's first CRLF-ended line; a line holding a lone CR or LF,
// or no CRLF, is refused.
func cutLine(b []byte) (line, rest []byte, ok bool) {
	i := bytes.IndexByte(b, '\n')
	if i < 1 || b[i-1] != '\r' {
		return nil, nil, false
	}
	line = b[:i-1]
	if bytes.IndexByte(line, '\r') >= 0 {
		return nil, nil, false
	}
	return line, b[i+1:], true
}

// splitHeader splits "Name: value": a token, a colon right after it, and
// a value of printable ASCII and tabs, spaces around it trimmed.
func splitHeader(line []byte) (name, value []byte, ok bool) {
	colon := bytes.IndexByte(line, ':')
	if colon < 1 {
		return nil, nil, false
	}
	name = line[:colon]
	for _, c := range name {
		if !isTokenChar(c) {
			return nil, nil, false
		}
	}
	value = line[colon+1:]
	for _, c := range value {
		if (c < ' ' && c != '\t') || c >= 0x7f {
			return nil, nil, false
		}
	}
	return name, trimOWS(value), true
}

func isTokenChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~':
		return true
	}
	return false
}

// validTarget accepts printable ASCII but '#', with well-formed percent
// escapes; the path (before '?') must be one net/http's mux would not
// redirect: no empty, "." or ".." segment, written or escaped.
func validTarget(t []byte) bool {
	inPath := true
	for i := 0; i < len(t); i++ {
		c := t[i]
		switch {
		case c <= ' ' || c >= 0x7f || c == '#':
			return false
		case c == '%':
			if i+2 >= len(t) || !isHex(t[i+1]) || !isHex(t[i+2]) {
				return false
			}
			if inPath && (t[i+1] == '2' && (t[i+2]|0x20 == 'e' || t[i+2]|0x20 == 'f')) {
				return false // an escaped '.' or '/'
			}
		case c == '?':
			inPath = false
		case c == '/' && inPath:
			next := t[i+1:]
			if q := bytes.IndexByte(next, '?'); q >= 0 {
				next = next[:q]
			}
			if s := bytes.IndexByte(next, '/'); s >= 0 {
				next = next[:s]
			} else if len(next) == 0 {
				continue // a trailing slash
			}
			if len(next) == 0 || string(next) == "." || string(next) == ".." {
				return false
			}
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// validHost accepts a host name or address and a port: letters, digits,
// '-', '.', ':', '[' and ']'.
func validHost(h []byte) bool {
	if len(h) == 0 || len(h) > 255 {
		return false
	}
	for _, c := range h {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '-', c == '.', c == ':', c == '[', c == ']':
		default:
			return false
		}
	}
	return true
}

// parseLength reads a Content-Length: digits only, at most 15.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 15 {
		return 0, false
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// eachToken calls fn with each token of a comma-separated list, spaces
// trimmed and empty ones skipped, until fn returns false; it returns
// what fn last returned.
func eachToken(v []byte, fn func([]byte) bool) bool {
	for len(v) > 0 {
		var t []byte
		if i := bytes.IndexByte(v, ','); i >= 0 {
			t, v = v[:i], v[i+1:]
		} else {
			t, v = v, nil
		}
		if t = trimOWS(t); len(t) > 0 && !fn(t) {
			return false
		}
	}
	return true
}

// equalFold compares b with lower, which is in lower case, ignoring
// ASCII case.
func equalFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := range len(b) {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// hopByHopName is hopByHop for a name in any case.
func hopByHopName(name []byte) bool { return foldIn(name, hopByHopNames) }

var hopByHopNames = []string{"connection", "proxy-connection", "keep-alive", "proxy-authenticate",
	"proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"}

// foldIn tells whether name is one of names (in lower case), ignoring
// ASCII case.
func foldIn(name []byte, names []string) bool {
	for _, n := range names {
		if equalFold(name, n) {
			return true
		}
	}
	return false
}

// namedIn tells whether name is among tokens, ignoring case.
func namedIn(name []byte, tokens [][]byte) bool {
	for _, t := range tokens {
		if bytes.EqualFold(name, t) {
			return true
		}
	}
	return false
}

// appendStatusLine appends an answer's status line as net/http writes it.
func appendStatusLine(b []byte, code int) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, ' ')
	if text := http.StatusText(code); text != "" {
		b = append(b, text...)
	} else {
		b = append(b, "status code "...)
		b = strconv.AppendInt(b, int64(code), 10)
	}
	return append(b, "\r\n"...)
}

// trimOWS trims the spaces and tabs around a header's value (bytes.Trim
// builds its set of bytes on every call).
func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}
