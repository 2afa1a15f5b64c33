package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/pool"
)

func TestRequestHeadSubset(t *testing.T) {
	const ok, general = true, false
	tests := []struct {
		name string
		head string
		fast bool
	}{
		{"plain GET", "GET /vm/x/ HTTP/1.1\r\nHost: a.example\r\n\r\n", ok},
		{"query and escapes", "GET /a%20b/c?x=1&y=%2F HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\n\r\n", ok},
		{"small body", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n", ok},
		{"connection close", "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", ok},
		{"HTTP/1.0", "GET / HTTP/1.0\r\nHost: a\r\n\r\n", general},
		{"no Host", "GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", general},
		{"two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", general},
		{"Host with a space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", general},
		{"absolute form", "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"asterisk", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"CONNECT", "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"lower-case method", "get / HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"bare LF", "GET / HTTP/1.1\nHost: a\n\n", general},
		{"bare LF in a header", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nX-B: c\r\n\r\n", general},
		{"bare CR", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", general},
		{"folded header", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", general},
		{"space before colon", "GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", general},
		{"NUL in a value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00\r\n\r\n", general},
		{"non-ASCII value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: caf\xc3\xa9\r\n\r\n", general},
		{"chunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", general},
		{"length and chunked", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", general},
		{"two lengths", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", general},
		{"signed length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", general},
		{"expect", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n", general},
		{"websocket", "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", general},
		{"double slash", "GET /vm/x//y HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"dot segment", "GET /vm/x/../y HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"escaped dot segment", "GET /vm/x/%2e%2E/y HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"escaped slash", "GET /vm/x%2Fy HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"bad escape", "GET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"fragment", "GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", general},
		{"dots in the query", "GET /a?b=/../c HTTP/1.1\r\nHost: a\r\n\r\n", ok},
		{"trailing slash", "GET /vm/x/ HTTP/1.1\r\nHost: a\r\n\r\n", ok},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r fastRequest
			if got := parseRequestHead([]byte(tt.head), &r); got != tt.fast {
				t.Errorf("fast path: %v, want %v", got, tt.fast)
			}
		})
	}
}

// FuzzRequestHead: whatever head the fast path reads itself, net/http
// reads too, and reads alike.
func FuzzRequestHead(f *testing.F) {
	for _, s := range []string{
		"GET /vm/x/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
		"POST /a?b HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-for: 5.6.7.8\r\n\r\n",
		"DELETE /%41 HTTP/1.1\r\nhost: [::1]:80\r\nCookie: a=b; c=d\r\nConnection: close\r\n\r\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, head string) {
		var r fastRequest
		if !parseRequestHead([]byte(head), &r) {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(head)))
		if err != nil {
			t.Fatalf("the fast path reads %q, net/http refuses it: %v", head, err)
		}
		target := string(r.path)
		if r.hasQuery {
			target += "?" + string(r.query)
		}
		switch {
		case req.Method != string(r.method):
			t.Fatalf("%q: method %q, net/http %q", head, r.method, req.Method)
		case req.RequestURI != target:
			t.Fatalf("%q: target %q, net/http %q", head, target, req.RequestURI)
		case req.Host != string(r.host):
			t.Fatalf("%q: host %q, net/http %q", head, r.host, req.Host)
		case req.ContentLength != r.contentLength:
			t.Fatalf("%q: length %d, net/http %d", head, r.contentLength, req.ContentLength)
		case req.Close != r.close:
			t.Fatalf("%q: close %v, net/http %v", head, r.close, req.Close)
		case req.URL.EscapedPath() != string(r.path) && req.URL.RawPath != "":
			t.Fatalf("%q: path %q, net/http %q", head, r.path, req.URL.EscapedPath())
		}
		seen := map[string][]string{}
		for _, h := range r.headers {
			k := textproto.CanonicalMIMEHeaderKey(string(h.name))
			seen[k] = append(seen[k], string(h.value))
		}
		for k, vv := range req.Header {
			if !slices.Equal(seen[k], vv) {
				t.Fatalf("%q: header %s %q, net/http %q", head, k, seen[k], vv)
			}
		}
	})
}

// rawExchange sends data on a new connection to srv and reads answers
// until n are read.
func rawExchange(t *testing.T, srv *httptest.Server, data string, n int) []*http.Response {
	t.Helper()
	conn := rawConn(t, srv)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, data); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	sent := bufio.NewReader(strings.NewReader(data))
	var resps []*http.Response
	for range n {
		req, err := http.ReadRequest(sent)
		if err != nil {
			t.Fatalf("request %d: %v", len(resps)+1, err)
		}
		io.Copy(io.Discard, req.Body)
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			t.Fatalf("answer %d: %v", len(resps)+1, err)
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("answer %d: %v", len(resps)+1, err)
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resps = append(resps, resp)
	}
	return resps
}

func frontOf(srv *httptest.Server) *Front { return srv.Listener.(*Front) }

// TestFastPathPipelinesAndHandsOver: requests pipelined on one connection
// are answered in order by the fast path, until one it does not take
// (here a node route) gives the connection, the bytes already read
// included, to net/http, which answers the rest.
func TestFastPathPipelinesAndHandsOver(t *testing.T) {
	srv := newTestAPI(t, &launcher{handler: echoHandler()})
	prog := "GET /vm/" + string(ref) + "/p%d?n=%d HTTP/1.1\r\nHost: node.example\r\n\r\n"
	data := fmt.Sprintf(prog, 1, 1) + fmt.Sprintf(prog, 2, 2) +
		"POST /vm/" + string(ref) + "/upload HTTP/1.1\r\nHost: node.example\r\nContent-Length: 5\r\n\r\nhello" +
		"GET /about/executions/list HTTP/1.1\r\nHost: node.example\r\n\r\n" +
		fmt.Sprintf(prog, 3, 3)
	resps := rawExchange(t, srv, data, 5)
	want := []string{"GET /p1?n=1", "GET /p2?n=2", "5 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", "", "GET /p3?n=3"}
	for i, resp := range resps {
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || (want[i] != "" && string(body) != want[i]) {
			t.Errorf("answer %d: %d %q, want 200 %q", i+1, resp.StatusCode, body, want[i])
		}
	}
	if got := frontOf(srv).handed.Load(); got != 1 {
		t.Errorf("connections handed to net/http: %d, want 1", got)
	}
}

// TestFastPathAsNetHTTP: a program sees the same request, and a client
// the same answer, on the fast path and on net/http's.
func TestFastPathAsNetHTTP(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		var lines []string
		for k, vv := range r.Header {
			lines = append(lines, k+": "+strings.Join(vv, " | "))
		}
		sort.Strings(lines)
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Connection", "X-Hop")
		w.Header().Set("X-Hop", "dropped")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Add("X-Multi", "1")
		w.Header().Add("X-Multi", "2")
		fmt.Fprintf(w, "%s %s %s host=%s len=%d\n%s", r.Method, r.URL.RequestURI(), r.Proto, r.Host, r.ContentLength, strings.Join(lines, "\n"))
	})
	mux.HandleFunc("/chunked", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		io.WriteString(w, "part one,")
		w.(http.Flusher).Flush()
		io.WriteString(w, "part two")
		w.Header().Set("X-Sum", "17")
	})
	mux.HandleFunc("/empty", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	requests := []string{
		"GET /vm/" + string(ref) + "/a/b?c=d&e HTTP/1.1\r\nHost: node.example\r\nUser-Agent: t\r\nX-Forwarded-For: 10.0.0.1\r\n" +
			"Connection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: 1\r\nTE: trailers\r\nX-Forwarded-Proto: https\r\nForwarded: for=x\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n",
		"POST /vm/" + string(ref) + "/form HTTP/1.1\r\nHost: node.example\r\nContent-Length: 7\r\nContent-Type: text/plain\r\n\r\nabcdefg",
		"POST /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: node.example\r\nContent-Length: 0\r\n\r\n",
		"HEAD /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: node.example\r\n\r\n",
		"GET /vm/" + string(ref) + "/chunked HTTP/1.1\r\nHost: node.example\r\nTE: trailers\r\n\r\n",
		"GET /vm/" + string(ref) + "/empty HTTP/1.1\r\nHost: node.example\r\n\r\n",
		"GET /vm/" + string(ref) + " HTTP/1.1\r\nHost: node.example\r\n\r\n",
		"GET /?q=1 HTTP/1.1\r\nHost: " + hostLabel(t) + ".node.example\r\n\r\n",
		"GET /vm/" + string(ref) + "/x HTTP/1.1\r\nHost: node.example\r\nConnection: close\r\n\r\n",
	}
	for _, req := range requests {
		name, _, _ := strings.Cut(req, "\r\n")
		t.Run(name, func(t *testing.T) {
			var answers [2]string
			for i, noFast := range []bool{false, true} {
				srv := newTestAPI(t, &launcher{handler: mux})
				frontOf(srv).noFast.Store(noFast)
				resp := rawExchange(t, srv, req, 1)[0]
				answers[i] = describe(t, resp, srv)
				if handed := frontOf(srv).handed.Load(); (handed == 1) != noFast {
					t.Fatalf("noFast %v: %d connections handed to net/http", noFast, handed)
				}
			}
			if answers[0] != answers[1] {
				t.Errorf("fast path:\n%s\nnet/http:\n%s", answers[0], answers[1])
			}
		})
	}
}

func hostLabel(t *testing.T) string {
	label, err := LabelFromRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	return label
}

// describe writes an answer down for comparison: its status, headers
// (Date and the client's port left out), body and trailers.
func describe(t *testing.T, resp *http.Response, srv *httptest.Server) string {
	t.Helper()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for k, vv := range resp.Header {
		if k == "Date" {
			continue
		}
		lines = append(lines, k+": "+strings.Join(vv, " | "))
	}
	sort.Strings(lines)
	return fmt.Sprintf("%s %v len=%d %v\n%s\n%s\ntrailer %v", resp.Proto, resp.StatusCode, resp.ContentLength, resp.TransferEncoding,
		strings.Join(lines, "\n"), body, resp.Trailer)
}

// TestFrontCloseFinishesRequests: closing the listener closes idle
// connections of the fast path at once, and lets a request in flight be
// answered before its connection closes.
func TestFrontCloseFinishesRequests(t *testing.T) {
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "done")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	log := slog.New(slog.DiscardHandler)
	p := pool.New(pool.Options{Launcher: &launcher{handler: mux, memory: 128, timeout: 5 * time.Second}, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
	defer p.Shutdown(context.Background())
	s := New(Options{Programs: p, Auth: tokenAuth{}, Domain: "node.example", Version: "test", Log: log})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	front := s.Listener(ln)
	srv := s.HTTPServer()
	go srv.Serve(front)

	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	get := func(c net.Conn, br *bufio.Reader, path string) (string, error) {
		fmt.Fprintf(c, "GET /vm/%s%s HTTP/1.1\r\nHost: node.example\r\n\r\n", ref, path)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return "", err
		}
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	idle, idleR := dial()
	if body, err := get(idle, idleR, "/"); err != nil || body != "ok" {
		t.Fatalf("first request: %q %v", body, err)
	}
	busy, busyR := dial()
	answered := make(chan string, 1)
	go func() {
		body, err := get(busy, busyR, "/slow")
		answered <- fmt.Sprint(body, err)
	}()
	time.Sleep(200 * time.Millisecond) // the slow request reaches the program

	shutdown := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		shutdown <- front.Wait(ctx)
	}()
	if !closedByServer(idle, 2*time.Second) {
		t.Error("an idle connection of the fast path stays open after Close")
	}
	select {
	case err := <-shutdown:
		t.Fatalf("the front's Wait returned with a request in flight: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if got := <-answered; got != "done<nil>" {
		t.Errorf("request in flight at Close: %s", got)
	}
	if err := <-shutdown; err != nil {
		t.Errorf("Wait: %v", err)
	}
	if !closedByServer(busy, 2*time.Second) {
		t.Error("the busy connection stays open after its answer")
	}
}

// TestFastPathShortAnswerEndsConnection: an answer cut before its
// Content-Length (an event stream here, flushed as it comes) ends the
// client's connection, which must not carry another answer out of step.
func TestFastPathShortAnswerEndsConnection(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\ndata: 1\n\n")
		brw.Flush()
	})
	srv := newTestAPI(t, &launcher{handler: mux})
	conn := rawConn(t, srv)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET /vm/%s/ HTTP/1.1\r\nHost: node.example\r\n\r\n", ref)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) || string(body) != "data: 1\n\n" {
		t.Errorf("a cut answer read as %q, %v: want its 9 bytes, then the connection closed", body, err)
	}
	if got := frontOf(srv).handed.Load(); got != 0 {
		t.Errorf("served by net/http (%d), not the fast path", got)
	}
}

func TestTrimOWS(t *testing.T) {
	for in, want := range map[string]string{"": "", " \t": "", "a": "a", " a b\t": "a b", "\t\ta": "a", "a  ": "a", "\va\v": "\va\v"} {
		if got := string(trimOWS([]byte(in))); got != want {
			t.Errorf("trimOWS(%q) = %q, want %q", in, got, want)
		}
	}
}
