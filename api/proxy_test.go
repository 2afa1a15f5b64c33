package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alephvm/alephvm/pool"
)

// newProxyAPI serves the API with programs that h answers, and returns
// its server and the API itself (to reach its proxy).
func newProxyAPI(t *testing.T, h http.Handler, timeout time.Duration, maxBody int64) (*httptest.Server, *Server) {
	t.Helper()
	return newProxyAPIWith(t, &launcher{handler: h, memory: 128, timeout: timeout}, maxBody)
}

// newProxyAPIWith is newProxyAPI with the launcher l.
func newProxyAPIWith(t *testing.T, l *launcher, maxBody int64) (*httptest.Server, *Server) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
	s := New(Options{Programs: p, Auth: tokenAuth{}, Domain: "node.example", MaxBodyBytes: maxBody, Version: "test", Log: log})
	srv := httptest.NewServer(s)
	t.Cleanup(func() { srv.Close(); p.Shutdown(context.Background()) })
	return srv, s
}

// rawRequest sends req as is on a new connection to srv and returns the
// answer and its body.
func rawRequest(t *testing.T, srv *httptest.Server, req string) (*http.Response, string) {
	t.Helper()
	conn := rawConn(t, srv)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, req)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// writeRequestHead sends the client's headers but the hop-by-hop ones,
// and sets the forwarding and framing headers itself.
func TestRequestHeadForProgram(t *testing.T) {
	cases := []struct {
		name   string
		raw    string
		want   map[string]string // header: value, "" for absent
		target string
	}{
		{"hop-by-hop removed, the others kept",
			"GET /a?b=c HTTP/1.1\r\nHost: prog.example\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\n" +
				"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic x\r\nTe: gzip\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n",
			map[string]string{"X-Kept": "yes", "X-Private": "", "Connection": "", "Keep-Alive": "", "Proxy-Connection": "",
				"Proxy-Authorization": "", "Te": "", "Trailer": "", "Upgrade": "", "Host": "prog.example"},
			"/p/a?b=c"},
		{"Te: trailers is kept",
			"GET / HTTP/1.1\r\nHost: h\r\nTe: trailers, gzip\r\n\r\n",
			map[string]string{"Te": "trailers"}, "/p/"},
		{"forwarding headers set by the node, after the client's proxies",
			"GET / HTTP/1.1\r\nHost: h:8080\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\nForwarded: for=x\r\n\r\n",
			map[string]string{"X-Forwarded-For": "10.0.0.1, 192.0.2.7", "X-Forwarded-Host": "h:8080", "X-Forwarded-Proto": "http", "Forwarded": ""},
			"/p/"},
		{"a websocket's upgrade is asked again",
			"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
			map[string]string{"Connection": "Upgrade", "Upgrade": "websocket", "Sec-Websocket-Key": "k"}, "/p/ws"},
		{"a chunked body stays chunked, Expect is answered by the node",
			"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
			map[string]string{"Transfer-Encoding": "chunked", "Expect": "", "Content-Length": ""}, "/p/"},
		{"a POST without a body says so",
			"POST / HTTP/1.1\r\nHost: h\r\n\r\n",
			map[string]string{"Content-Length": "0"}, "/p/"},
		{"a body's length is kept",
			"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
			map[string]string{"Content-Length": "3"}, "/p/"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in, err := http.ReadRequest(bufio.NewReader(strings.NewReader(tc.raw)))
			if err != nil {
				t.Fatal(err)
			}
			in.RemoteAddr = "192.0.2.7:5555"
			var buf bytes.Buffer
			bw := bufio.NewWriter(&buf)
			writeRequestHead(bw, in, "/p"+in.URL.EscapedPath(), upgradeType(in.Header))
			bw.Flush()
			out, err := http.ReadRequest(bufio.NewReader(&buf))
			if err != nil {
				t.Fatalf("the program cannot read %q: %v", buf.String(), err)
			}
			if out.RequestURI != tc.target {
				t.Errorf("target %q, want %q", out.RequestURI, tc.target)
			}
			for k, v := range tc.want {
				got := out.Header.Get(k)
				switch k {
				case "Host":
					got = out.Host
				case "Transfer-Encoding":
					got = strings.Join(out.TransferEncoding, ",")
				}
				if got != v {
					t.Errorf("%s: %q, want %q (head %q)", k, got, v, buf.String())
				}
			}
		})
	}
}

func TestAnswerHeadersForClient(t *testing.T) {
	cases := []struct {
		name string
		from http.Header
		want map[string]string
	}{
		{"hop-by-hop removed",
			http.Header{"Connection": {"X-Private"}, "X-Private": {"1"}, "Keep-Alive": {"timeout=5"}, "Proxy-Authenticate": {"Basic"},
				"Transfer-Encoding": {"chunked"}, "Upgrade": {"h2c"}, "Content-Type": {"text/plain"}},
			map[string]string{"Content-Type": "text/plain", "X-Private": "", "Keep-Alive": "", "Connection": "", "Proxy-Authenticate": "",
				"Transfer-Encoding": "", "Upgrade": ""}},
		{"the node's Server comes first", http.Header{"Server": {"uvicorn"}}, map[string]string{"Server": "aleph-vm/test"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst := http.Header{"Server": {"aleph-vm/test"}}
			copyHeaders(dst, tc.from)
			for k, v := range tc.want {
				if got := dst.Get(k); got != v {
					t.Errorf("%s: %q, want %q", k, got, v)
				}
			}
		})
	}
}

// A program's own Connection and Keep-Alive headers do not reach the
// client; the node's do not reach the program.
func TestHopByHopThroughTheNode(t *testing.T) {
	seen := make(chan http.Header, 1)
	srv, _ := newProxyAPI(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
		w.Header().Set("X-Private", "1")
		w.Header().Set("Connection", "X-Private")
		io.WriteString(w, "ok")
	}), 5*time.Second, 0)
	resp, body := rawRequest(t, srv, "GET /vm/"+string(ref)+"/ HTTP/1.1\r\nHost: node\r\nConnection: X-Mine\r\nX-Mine: 1\r\nX-Kept: 1\r\n\r\n")
	h := <-seen
	if body != "ok" || resp.Header.Get("X-Private") != "" || h.Get("X-Mine") != "" || h.Get("X-Kept") != "1" {
		t.Errorf("answer %q %v; program saw %v", body, resp.Header, h)
	}
}

// The node sends requests to a program on the connections it keeps: one
// client after another use one connection.
func TestConnectionsToProgramsAreReused(t *testing.T) {
	var mu sync.Mutex
	peers := map[string]int{}
	srv, s := newProxyAPI(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		peers[r.RemoteAddr]++
		mu.Unlock()
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	}), 5*time.Second, 0)
	for i := range 20 {
		method, body := "GET", ""
		if i%2 == 1 {
			method, body = "POST", "some body"
		}
		req, _ := http.NewRequest(method, srv.URL+"/vm/"+string(ref)+"/", strings.NewReader(body))
		req.Close = true // a new client each time
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	mu.Lock()
	defer mu.Unlock()
	if len(peers) != 1 {
		t.Errorf("20 requests in turn came on %d connections: %v", len(peers), peers)
	}
	for prog := range s.proxy.conns.idle {
		if n := s.proxy.conns.idleCount(prog); n != 1 {
			t.Errorf("%d idle connections kept", n)
		}
	}
}

// closeAfterAnswer answers, then closes the connection without saying so
// beforehand, as a program's server closing an idle connection does.
func closeAfterAnswer(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	brw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	brw.Flush()
	conn.Close()
}

// A connection the program closed while it was idle is not used for the
// next request: it is found closed (probe), or the request is sent again
// on a new connection when that is safe (it is idempotent, nothing came
// back). A request that is not idempotent, written on a closed connection
// not checked, fails rather than risk being done twice.
func TestClosedIdleConnection(t *testing.T) {
	cases := []struct {
		name       string
		probeAfter time.Duration
		method     string
		body       string
		status     int
	}{
		{"GET retried on a new connection", time.Hour, "GET", "", 200},
		{"HEAD retried on a new connection", time.Hour, "HEAD", "", 200},
		{"POST on a connection found closed", 0, "POST", "", 200},
		{"POST with a body on a connection found closed", 0, "POST", "data", 200},
		{"POST on a connection not checked is not sent twice", time.Hour, "POST", "", 502},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv, s := newProxyAPI(t, http.HandlerFunc(closeAfterAnswer), 5*time.Second, 0)
			s.proxy.conns.probeAfter = tc.probeAfter
			for i := range 2 {
				req, _ := http.NewRequest(tc.method, srv.URL+"/vm/"+string(ref)+"/", strings.NewReader(tc.body))
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if want := map[int]int{0: 200, 1: tc.status}[i]; resp.StatusCode != want {
					t.Errorf("request %d: status %d, want %d", i+1, resp.StatusCode, want)
				}
				// Let the program's close reach the node.
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// A program that does not answer in time is answered 504 for; its
// connection is not reused, and the next request is served.
func TestProgramTimeout(t *testing.T) {
	release := make(chan struct{})
	srv, s := newProxyAPI(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/late" {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		io.WriteString(w, "ok")
	}), 300*time.Millisecond, 0)
	defer close(release)
	for _, tc := range []struct {
		path   string
		status int
	}{{"/late", 504}, {"/", 200}, {"/late", 504}, {"/", 200}} {
		resp, body := get(t, srv.URL+"/vm/"+string(ref)+tc.path, "")
		if resp.StatusCode != tc.status {
			t.Errorf("%s: %d %s", tc.path, resp.StatusCode, body)
		}
		if tc.status == 504 {
			var e apiError
			if json.Unmarshal([]byte(body), &e) != nil || e.Error != "Program did not respond within resources.seconds" {
				t.Errorf("504 body %q", body)
			}
		}
	}
	for prog := range s.proxy.conns.idle {
		if n := s.proxy.conns.idleCount(prog); n != 1 {
			t.Errorf("%d idle connections, want the one of the answered requests", n)
		}
	}
}

// resources.seconds bounds the program's answer, not its boot: ten VMs
// booting together on a busy node take longer than it, and their first
// requests were answered 504 on the fast path, which counted from the
// request's arrival (the load suite's full run found it).
func TestBootIsNotTheProgramsTime(t *testing.T) {
	booting := func() *launcher {
		return &launcher{handler: echoHandler(), memory: 128, timeout: 300 * time.Millisecond, boot: time.Second}
	}
	slow, _ := newProxyAPIWith(t, booting(), 0)
	for name, srv := range map[string]*httptest.Server{"fast path": newTestAPI(t, booting()), "net/http": slow} {
		resp, body := get(t, srv.URL+"/vm/"+string(ref)+"/", "")
		if resp.StatusCode != 200 {
			t.Errorf("%s: a program that booted for 1 s, then answered at once: %d %s", name, resp.StatusCode, body)
		}
	}
}

// A client that leaves while its program boots takes its request with
// it: the program, once booted, never sees it. On both paths the wait
// watches the client's socket: net/http cancels a request's context on
// the client's close only once its body is read.
func TestClientLeavesDuringBoot(t *testing.T) {
	for _, path := range []string{"fast path", "net/http"} {
		t.Run(path, func(t *testing.T) {
			var seen atomic.Int32
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { seen.Add(1) })
			l := &launcher{handler: h, memory: 128, timeout: 5 * time.Second, boot: 1500 * time.Millisecond}
			// A chunked body is not for the fast path: net/http serves it.
			req := "POST /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
			if path == "net/http" {
				req = "POST /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
			}
			conn := rawConn(t, newTestAPI(t, l))
			io.WriteString(conn, req)
			time.Sleep(200 * time.Millisecond)
			conn.Close()
			// The boot ends; a request then would reach the program at once.
			time.Sleep(2500 * time.Millisecond)
			if n := seen.Load(); n != 0 {
				t.Errorf("the program got %d requests of a client that had left", n)
			}
		})
	}
}

// A client that leaves ends the request to the program, whether the
// program writes (the write to the client fails) or is silent (the
// watchdog sees the client gone).
func TestClientLeavesMidStream(t *testing.T) {
	for _, tc := range []struct {
		name   string
		silent bool
	}{{"program writing", false}, {"program silent", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ended := make(chan struct{})
			srv, _ := newProxyAPI(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				defer close(ended)
				w.Header().Set("Content-Type", "text/event-stream")
				io.WriteString(w, "data: first\n\n")
				w.(http.Flusher).Flush()
				for {
					select {
					case <-r.Context().Done():
						return
					case <-time.After(10 * time.Millisecond):
					}
					if !tc.silent {
						if _, err := io.WriteString(w, strings.Repeat("data: more\n\n", 100)); err != nil {
							return
						}
						w.(http.Flusher).Flush()
					}
				}
			}), 5*time.Second, 0)
			conn := rawConn(t, srv)
			io.WriteString(conn, "GET /vm/"+string(ref)+"/events HTTP/1.1\r\nHost: node\r\n\r\n")
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(resp.Body).ReadString('\n')
			if err != nil || line != "data: first\n" {
				t.Fatalf("first event: %q %v", line, err)
			}
			conn.Close()
			select {
			case <-ended:
			case <-time.After(10 * time.Second):
				t.Fatal("the program's request goes on after its client left")
			}
		})
	}
}

// Answers of unknown length are streamed as the program writes them,
// chunked or ended by closing the connection.
func TestStreamedAnswers(t *testing.T) {
	next := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/chunked", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		<-next
		io.WriteString(w, "second\n")
	})
	mux.HandleFunc("/until-close", func(w http.ResponseWriter, r *http.Request) {
		conn, brw, _ := http.NewResponseController(w).Hijack()
		defer conn.Close()
		brw.WriteString("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst\n")
		brw.Flush()
		<-next
		brw.WriteString("second\n")
		brw.Flush()
	})
	mux.HandleFunc("/trailers", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		<-next
		io.WriteString(w, "second\n")
		w.Header().Set("X-Sum", "42")
	})
	srv, _ := newProxyAPI(t, mux, 5*time.Second, 0)
	for _, path := range []string{"/chunked", "/until-close", "/trailers"} {
		t.Run(path, func(t *testing.T) {
			resp, err := http.Get(srv.URL + "/vm/" + string(ref) + path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			br := bufio.NewReader(resp.Body)
			if line, err := br.ReadString('\n'); err != nil || line != "first\n" {
				t.Fatalf("first line: %q %v", line, err)
			}
			next <- struct{}{}
			if rest, _ := io.ReadAll(br); string(rest) != "second\n" {
				t.Errorf("rest %q", rest)
			}
			if path == "/trailers" && resp.Trailer.Get("X-Sum") != "42" {
				t.Errorf("trailer %v", resp.Trailer)
			}
		})
	}
}

// An upgrade other than a websocket passes: the 101 has the node's
// headers, and bytes go both ways, those the client sent with its request
// included.
func TestUpgradePassesThrough(t *testing.T) {
	srv, _ := newProxyAPI(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "upgrade to echo only", 400)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		brw.Flush()
		for {
			line, err := brw.ReadString('\n')
			if err != nil {
				return
			}
			brw.WriteString("echo " + line)
			brw.Flush()
		}
	}), 5*time.Second, 0)
	conn := rawConn(t, srv)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "GET /vm/"+string(ref)+"/ HTTP/1.1\r\nHost: node\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nsent early\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 101 || resp.Header.Get("Aleph-Program-ItemHash") != string(ref) || resp.Header.Get("Upgrade") != "echo" {
		t.Fatalf("%d %v", resp.StatusCode, resp.Header)
	}
	for _, msg := range []string{"sent early\n", "then\n"} {
		if msg == "then\n" {
			io.WriteString(conn, msg)
		}
		if line, err := br.ReadString('\n'); err != nil || line != "echo "+msg {
			t.Errorf("got %q %v", line, err)
		}
	}
}

// Failures of the program are answered with the node's errors.
func TestProgramFailures(t *testing.T) {
	cases := []struct {
		name     string
		handler  http.HandlerFunc
		req      string
		status   int
		contains string
	}{
		{"connection closed before an answer", func(w http.ResponseWriter, r *http.Request) { panic(http.ErrAbortHandler) },
			"GET /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: node\r\n\r\n", 502, "VM did not respond"},
		{"101 not asked for", func(w http.ResponseWriter, r *http.Request) {
			conn, brw, _ := http.NewResponseController(w).Hijack()
			defer conn.Close()
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: other\r\n\r\n")
			brw.Flush()
		}, "GET /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: node\r\n\r\n", 502, "VM did not respond"},
		{"chunked body past the limit", func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			io.WriteString(w, "read it all")
		}, "POST /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: node\r\nTransfer-Encoding: chunked\r\n\r\n" +
			fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", 2048, strings.Repeat("x", 2048)), 413, "larger than the node accepts"},
		{"interim answers passed over", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			io.WriteString(w, "final")
		}, "GET /vm/" + string(ref) + "/ HTTP/1.1\r\nHost: node\r\n\r\n", 200, "final"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv, _ := newProxyAPI(t, tc.handler, 5*time.Second, 1024)
			resp, body := rawRequest(t, srv, tc.req)
			if resp.StatusCode != tc.status || !strings.Contains(body, tc.contains) {
				t.Errorf("%d %q", resp.StatusCode, body)
			}
		})
	}
}

// trackedConn notes that it was closed.
type trackedConn struct {
	net.Conn
	closed bool
}

func (c *trackedConn) Close() error { c.closed = true; return nil }

// The idle connections kept are bounded per program and in all, those of
// a stopped program are not kept, and the sweep closes those idle too
// long.
func TestIdleConnectionLimits(t *testing.T) {
	u := newUpstreams()
	u.maxPerProgram, u.maxTotal = 2, 3
	a, b := &vm{done: make(chan struct{})}, &vm{done: make(chan struct{})}
	put := func(prog pool.Program) *trackedConn {
		c := &trackedConn{}
		u.put(&upstreamConn{conn: c, prog: prog})
		return c
	}
	var kept []*trackedConn
	for _, tc := range []struct {
		name string
		prog pool.Program
		kept bool
	}{
		{"first of a", a, true}, {"second of a", a, true}, {"third of a, past the program's bound", a, false},
		{"first of b", b, true}, {"second of b, past the bound in all", b, false},
	} {
		c := put(tc.prog)
		if c.closed == tc.kept {
			t.Errorf("%s: kept %v, want %v", tc.name, !c.closed, tc.kept)
		}
		if !c.closed {
			kept = append(kept, c)
		}
	}
	if u.idleCount(a) != 2 || u.idleCount(b) != 1 {
		t.Errorf("idle: a %d, b %d", u.idleCount(a), u.idleCount(b))
	}
	c, reused, err := u.get(context.Background(), a, time.Time{})
	if err != nil || !reused || c.conn != kept[1] {
		t.Errorf("get: %v %v, want the last one kept (%v)", reused, err, c)
	}

	b.Stop(context.Background())
	if c := put(b); !c.closed {
		t.Error("a connection of a stopped program was kept")
	}
	u.sweep()
	if u.idleCount(b) != 0 || !kept[2].closed {
		t.Error("the sweep kept the connections of a stopped program")
	}
	if u.idleCount(a) != 1 || kept[0].closed {
		t.Error("the sweep closed a connection idle for less than idleTimeout")
	}
	u.idleTimeout = 0
	u.sweep()
	if u.idleCount(a) != 0 || !kept[0].closed || u.total != 0 {
		t.Errorf("the sweep left %d connections idle for too long", u.total)
	}
}

// The watchdog ends an exchange past its deadline, or whose client left,
// and no other.
func TestWatchdog(t *testing.T) {
	d := &watchdog{tick: time.Millisecond}
	left, leave := context.WithCancel(context.Background())
	cases := []struct {
		name     string
		ctx      context.Context
		deadline time.Time
		want     int32
	}{
		{"late", context.Background(), time.Now(), abortedTimeout},
		{"client left", left, time.Time{}, abortedClientLeft},
		{"in time", context.Background(), time.Now().Add(time.Hour), notAborted},
		{"no deadline", context.Background(), time.Time{}, notAborted},
	}
	xs := make([]*exchange, len(cases))
	for i, tc := range cases {
		x := &exchange{ctx: tc.ctx}
		if !tc.deadline.IsZero() {
			x.deadline.Store(tc.deadline.UnixNano())
		}
		server, client := net.Pipe()
		defer server.Close()
		defer client.Close()
		x.setConn(&upstreamConn{conn: client})
		d.watch(x)
		xs[i] = x
	}
	leave()
	for i, tc := range cases {
		x := xs[i]
		for start := time.Now(); tc.want != notAborted && x.reason.Load() == notAborted && time.Since(start) < 10*time.Second; {
			time.Sleep(time.Millisecond)
		}
		if tc.want == notAborted {
			time.Sleep(20 * time.Millisecond) // a few ticks
		}
		if got := x.reason.Load(); got != tc.want {
			t.Errorf("%s: reason %d, want %d", tc.name, got, tc.want)
		}
		if tc.want != notAborted {
			if _, err := x.up.Load().conn.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("%s: the connection still reads (%v)", tc.name, err)
			}
		}
	}
	for _, x := range xs {
		d.unwatch(x)
	}
}

// A VM whose port refuses the first connections (a neighbour resolution
// that failed, a listener not there yet) is connected to once it accepts,
// within the dial's time; a stopped VM is not waited for.
func TestDialRetriesATransientRefusal(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	accepted := make(chan net.Listener, 1)
	go func() {
		time.Sleep(300 * time.Millisecond)
		l, err := net.Listen("tcp", addr)
		if err != nil {
			close(accepted)
			return
		}
		accepted <- l
	}()
	u := newUpstreams()
	c, _, err := u.get(context.Background(), &addrProgram{addr: addr, done: make(chan struct{})}, time.Time{})
	if l, ok := <-accepted; ok {
		defer l.Close()
	}
	if err != nil {
		t.Fatalf("a VM that listens after 300 ms: %v", err)
	}
	c.conn.Close()

	l, _ = net.Listen("tcp", "127.0.0.1:0")
	refused := l.Addr().String()
	l.Close()
	stopped := &addrProgram{addr: refused, done: make(chan struct{})}
	close(stopped.done)
	start := time.Now()
	if _, _, err := u.get(context.Background(), stopped, time.Time{}); err == nil || time.Since(start) > time.Second {
		t.Errorf("a stopped VM: %v after %v", err, time.Since(start))
	}
}

// addrProgram is a program VM at addr.
type addrProgram struct {
	addr string
	done chan struct{}
}

func (p *addrProgram) Target() *url.URL            { return &url.URL{Scheme: "http", Host: p.addr, Path: "/"} }
func (p *addrProgram) Done() <-chan struct{}       { return p.done }
func (p *addrProgram) Stop(context.Context) error  { return nil }
func (p *addrProgram) Networking() pool.Networking { return pool.Networking{} }
