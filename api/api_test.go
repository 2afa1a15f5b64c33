package api

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

const ref = message.ItemHash("7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003")

// vm is a program VM stand-in: an HTTP server on loopback.
type vm struct {
	srv  *httptest.Server
	done chan struct{}
	once sync.Once
}

func (v *vm) Target() *url.URL      { u, _ := url.Parse(v.srv.URL); return u }
func (v *vm) Done() <-chan struct{} { return v.done }
func (v *vm) Networking() pool.Networking {
	return pool.Networking{IPv4Network: "172.16.4.0/24", IPv4: "172.16.4.2", HostIPv4: "172.16.4.1"}
}
func (v *vm) Stop(context.Context) error { v.once.Do(func() { close(v.done) }); return nil }

type notFound struct{ ref message.ItemHash }

func (e notFound) Error() string   { return "Item " + string(e.ref) + " not found" }
func (e notFound) HTTPStatus() int { return http.StatusNotFound }

type launcher struct {
	handler http.Handler
	remote  *url.URL // a program already running, instead of handler
	memory  int
	timeout time.Duration
	boot    time.Duration // how long a boot takes
	missing bool
	boots   int
	last    *vm
	mu      sync.Mutex
}

func (l *launcher) Plan(_ context.Context, r message.ItemHash) (*pool.Plan, error) {
	if l.missing {
		return nil, notFound{r}
	}
	return &pool.Plan{Ref: r, Revision: "1", VCPUs: 1, MemoryMiB: l.memory, Timeout: l.timeout, CodeRef: ref}, nil
}

func (l *launcher) Boot(_ context.Context, _ *pool.Plan) (pool.Program, error) {
	time.Sleep(l.boot)
	if l.remote != nil {
		return &remoteProgram{u: l.remote, done: make(chan struct{})}, nil
	}
	v := &vm{srv: httptest.NewServer(l.handler), done: make(chan struct{})}
	l.mu.Lock()
	l.boots++
	l.last = v
	l.mu.Unlock()
	return v, nil
}

func newTestAPI(t testing.TB, l *launcher) *httptest.Server {
	t.Helper()
	if l.memory == 0 {
		l.memory = 128
	}
	if l.timeout == 0 {
		l.timeout = 5 * time.Second
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
	s := New(Options{Programs: p, Auth: tokenAuth{}, Domain: "node.example", MaxBodyBytes: 200 << 20, Version: "test", Log: log})
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = s.HTTPServer()
	srv.Listener = s.Listener(srv.Listener)
	srv.Start()
	t.Cleanup(func() { srv.Close(); p.Shutdown(context.Background()) })
	return srv
}

func echoHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Path", r.URL.RawPath+"|"+r.URL.Path)
		w.Header().Set("X-Seen-Host", r.Host)
		fmt.Fprintf(w, "%s %s?%s", r.Method, r.URL.Path, r.URL.RawQuery)
	})
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	})
	// /stream sends a first line, then waits for the client to have read
	// it before it ends: it passes only if the proxy does not buffer.
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select {
		case <-streamRead:
			io.WriteString(w, "second\n")
		case <-time.After(5 * time.Second):
			io.WriteString(w, "timed out\n")
		}
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2 * time.Second)
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		for {
			typ, data, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, data); err != nil {
				return
			}
		}
	})
	return mux
}

func get(t *testing.T, u string, host string) (*http.Response, string) {
	t.Helper()
	return getWith(t, u, nil, host)
}

func getWith(t *testing.T, u string, h http.Header, host ...string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", u, nil)
	if h != nil {
		req.Header = h
	}
	if len(host) > 0 && host[0] != "" {
		req.Host = host[0]
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

func TestProxy(t *testing.T) {
	l := &launcher{handler: echoHandler()}
	srv := newTestAPI(t, l)
	resp, body := get(t, srv.URL+"/vm/"+string(ref)+"/a%2Fb/c?x=1&y=2", "")
	if resp.StatusCode != 200 || body != "GET /a/b/c?x=1&y=2" {
		t.Errorf("%d %q", resp.StatusCode, body)
	}
	if resp.Header.Get("X-Seen-Path") != "/a%2Fb/c|/a/b/c" {
		t.Errorf("escaped path not kept: %q", resp.Header.Get("X-Seen-Path"))
	}
	if resp.Header.Get("Aleph-Program-ItemHash") != string(ref) || resp.Header.Get("Server") != "aleph-vm/test" {
		t.Errorf("headers %v", resp.Header)
	}
	if _, body := get(t, srv.URL+"/vm/"+string(ref), ""); body != "GET /?" {
		t.Errorf("bare ref: %q", body)
	}

	label, _ := LabelFromRef(ref)
	resp, body = get(t, srv.URL+"/hello", label+".node.example")
	if resp.StatusCode != 200 || body != "GET /hello?" {
		t.Errorf("host routing: %d %q", resp.StatusCode, body)
	}
	if got, _ := refFromLabel(label); got != ref {
		t.Errorf("label round trip %s", got)
	}
	if l.boots != 1 {
		t.Errorf("%d boots", l.boots)
	}
}

// streamRead tells /stream that its first line reached the client.
var streamRead = make(chan struct{}, 1)

func TestStreamingResponse(t *testing.T) {
	srv := newTestAPI(t, &launcher{handler: echoHandler()})
	resp, err := http.Get(srv.URL + "/vm/" + string(ref) + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	if line, err := r.ReadString('\n'); err != nil || line != "first\n" {
		t.Fatalf("first line: %q %v", line, err)
	}
	streamRead <- struct{}{}
	if line, _ := r.ReadString('\n'); line != "second\n" {
		t.Errorf("second line: %q (the proxy held the first one back)", line)
	}
}

func TestUploadIntact(t *testing.T) {
	srv := newTestAPI(t, &launcher{handler: echoHandler()})
	const size = 100 << 20
	h := sha256.New()
	pr, pw := io.Pipe()
	written := make(chan struct{})
	go func() {
		defer close(written)
		buf := make([]byte, 1<<20)
		for i := range size / len(buf) {
			for j := range buf {
				buf[j] = byte(i + j)
			}
			h.Write(buf)
			pw.Write(buf)
		}
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", srv.URL+"/vm/"+string(ref)+"/upload", pr)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	<-written
	if want := fmt.Sprintf("%d %s", size, hex.EncodeToString(h.Sum(nil))); string(body) != want {
		t.Errorf("got %q want %q", body, want)
	}
}

func TestWebsocketPassesThrough(t *testing.T) {
	srv := newTestAPI(t, &launcher{handler: echoHandler()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/vm/"+string(ref)+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	for _, msg := range []string{"hello", strings.Repeat("x", 1<<16)} {
		if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		_, data, err := c.Read(ctx)
		if err != nil || string(data) != msg {
			t.Fatalf("echo %d bytes, %v", len(data), err)
		}
	}
}

func TestErrors(t *testing.T) {
	cases := []struct {
		name     string
		l        *launcher
		path     string
		status   int
		contains string
	}{
		{"invalid ref", &launcher{handler: echoHandler()}, "/vm/not-a-hash/", 400, "Invalid message reference"},
		{"missing item", &launcher{missing: true}, "/vm/" + string(ref) + "/", 404, "not found"},
		{"capacity", &launcher{handler: echoHandler(), memory: 4096}, "/vm/" + string(ref) + "/", 503, "Insufficient capacity"},
		{"timeout", &launcher{handler: echoHandler(), timeout: 200 * time.Millisecond}, "/vm/" + string(ref) + "/slow", 504, "resources.seconds"},
		{"program down", &launcher{handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			panic(http.ErrAbortHandler)
		})}, "/vm/" + string(ref) + "/", 502, "VM did not respond"},
		{"unknown about route", &launcher{}, "/about/nothing", 404, "Not Found"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := newTestAPI(t, tc.l)
			resp, body := get(t, srv.URL+tc.path, "")
			var e apiError
			if resp.StatusCode != tc.status || json.Unmarshal([]byte(body), &e) != nil || !strings.Contains(e.Error, tc.contains) {
				t.Errorf("%d %s", resp.StatusCode, body)
			}
			if tc.status == 503 && resp.Header.Get("Retry-After") == "" {
				t.Error("no Retry-After")
			}
		})
	}
}

func TestExecutionsListAndStop(t *testing.T) {
	srv := newTestAPI(t, &launcher{handler: echoHandler()})
	get(t, srv.URL+"/vm/"+string(ref)+"/", "")
	_, body := get(t, srv.URL+"/about/executions/list", "")
	var list map[string]struct {
		Networking struct{ IPv4 string } `json:"networking"`
		VMType     string                `json:"vm_type"`
	}
	if err := json.Unmarshal([]byte(body), &list); err != nil || list[string(ref)].Networking.IPv4 != "172.16.4.0/24" || list[string(ref)].VMType != "microvm" {
		t.Errorf("list %s (%v)", body, err)
	}
	_, body = get(t, srv.URL+"/v2/about/executions/list", "")
	if !strings.Contains(body, `"ipv4_ip":"172.16.4.2"`) || !strings.Contains(body, `"running":true`) {
		t.Errorf("v2 list %s", body)
	}
	if status, b := post(t, srv.URL+"/control/machine/"+string(ref)+"/stop", "", ""); status != 401 {
		t.Errorf("stop without credentials: %d %s", status, b)
	}
	if _, b := post(t, srv.URL+"/control/machine/"+string(ref)+"/stop", "good", ""); !strings.HasPrefix(b, "Stopped VM with ref") {
		t.Errorf("stop: %s", b)
	}
	if _, b := post(t, srv.URL+"/control/machine/"+string(ref)+"/stop", "good", ""); b != "Already stopped, nothing to do" {
		t.Errorf("second stop: %s", b)
	}
}
