package guest

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// apiAgent is a fake init that serves the guest API.
type apiAgent struct {
	*fakeAgent
	bridge *APIBridge
}

func (a apiAgent) APIBridge() *APIBridge { return a.bridge }

// socketClient calls the bridge as a workload does, on a unix socket.
func socketClient(t *testing.T, b *APIBridge) *http.Client {
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: b}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
}

func do(t *testing.T, c *http.Client, method, path string, body []byte) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://localhost"+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", "text/plain")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(got)
}

func TestAPIBridge(t *testing.T) {
	b := NewAPIBridge()
	agent := apiAgent{newFakeAgent(), b}
	client := newTestClient(t, agent)
	http := socketClient(t, b)

	// No session serves the API yet.
	if status, body := do(t, http, "GET", "/properties", nil); status != 503 {
		t.Errorf("before serving: %d %s", status, body)
	}

	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	var mu sync.Mutex
	release := make(chan struct{})
	go func() {
		served <- client.ServeAPI(ctx, func(ctx context.Context, c APICall) APIAnswer {
			switch c.Path {
			case "/slow":
				mu.Lock()
				r := release
				mu.Unlock()
				select {
				case <-r:
				case <-ctx.Done():
				}
			case "/big":
				return APIAnswer{Status: 200, Body: make([]byte, MaxAPIAnswer+1)}
			}
			return APIAnswer{Status: 201, ContentType: "application/json", Body: []byte(`{"method":"` + c.Method + `","path":"` + c.Path + `","body":"` + string(c.Body) + `"}`)}
		})
	}()
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return b.send != nil })

	status, body := do(t, http, "PUT", "/cache/a?x=1", []byte("42"))
	if status != 201 || body != `{"method":"PUT","path":"/cache/a?x=1","body":"42"}` {
		t.Errorf("call: %d %s", status, body)
	}
	if status, body := do(t, http, "GET", "/big", nil); status != 502 {
		t.Errorf("an answer past the bound: %d %.100s", status, body)
	}
	if status, _ := do(t, http, "POST", "/x", make([]byte, MaxAPIRequest+1)); status != 413 {
		t.Errorf("a body past the bound: %d", status)
	}
	if status, _ := do(t, http, "GET", "/"+strings.Repeat("a", maxAPIPath), nil); status != 414 {
		t.Errorf("a path past the bound: %d", status)
	}

	// MaxAPICalls calls wait on the host: one more is refused 429.
	results := make(chan int, MaxAPICalls)
	for range MaxAPICalls {
		go func() {
			status, _ := do(t, http, "GET", "/slow", nil)
			results <- status
		}()
	}
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return len(b.pending) == MaxAPICalls })
	if status, _ := do(t, http, "GET", "/slow", nil); status != 429 {
		t.Errorf("a call past the bound of calls: %d", status)
	}
	close(release)
	for range MaxAPICalls {
		if s := <-results; s != 201 {
			t.Errorf("a waiting call: %d", s)
		}
	}

	// The host stops serving: a waiting call gets 502, later ones 503.
	mu.Lock()
	release = make(chan struct{})
	mu.Unlock()
	go func() {
		status, _ := do(t, http, "GET", "/slow", nil)
		results <- status
	}()
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return len(b.pending) == 1 })
	cancel()
	if err := <-served; err != nil {
		t.Errorf("ServeAPI: %v", err)
	}
	if s := <-results; s != 502 {
		t.Errorf("a call cut by the session's end: %d", s)
	}
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return b.send == nil })
	if status, _ := do(t, http, "GET", "/properties", nil); status != 503 {
		t.Errorf("after serving: %d", status)
	}
}

func TestServeAPIWithoutAPI(t *testing.T) {
	client := newTestClient(t, newFakeAgent())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := client.ServeAPI(ctx, func(context.Context, APICall) APIAnswer { return APIAnswer{} })
	if err == nil || !strings.Contains(err.Error(), "serves no guest API") {
		t.Errorf("an init without the API: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting")
		}
	}
}
