package api

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/hypervisor/console"
	"github.com/alephvm/alephvm/internal/alephsdk"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// fakeLogs has two past lines, then one more after a while, then ends.
type fakeLogs struct{ calls atomic.Int32 }

func (f *fakeLogs) Follow(ctx context.Context, r message.ItemHash, fn func(LogLine) error) (bool, bool, error) {
	f.calls.Add(1)
	if r != ref {
		return false, false, nil
	}
	for _, l := range []LogLine{{Stream: "stdout", Text: "listening on 8080"}, {Stream: "stderr", Text: "Traceback"}} {
		if err := fn(l); err != nil {
			return true, false, err
		}
	}
	select {
	case <-ctx.Done():
		return true, false, ctx.Err()
	case <-time.After(50 * time.Millisecond):
	}
	if err := fn(LogLine{Stream: "system", Text: "program ended: exited with code 1"}); err != nil {
		return true, false, err
	}
	return true, true, nil
}

func newLogsAPI(t *testing.T, opts Options) *httptest.Server {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	opts.Programs, opts.Auth, opts.Version, opts.Log = pool.New(pool.Options{Log: log}), tokenAuth{}, "test", log
	srv := httptest.NewServer(New(opts))
	t.Cleanup(srv.Close)
	return srv
}

// getWith sends a GET with the given token and Origin (when not empty).
func getToken(t *testing.T, u, token string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", u, nil)
	if token != "" {
		req.Header.Set("X-Auth-Signature", token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

func dialLogs(ctx context.Context, srv *httptest.Server, r message.ItemHash, token, origin string) (*websocket.Conn, *http.Response, error) {
	h := http.Header{}
	if token != "" {
		h.Set("X-Auth-Signature", token)
	}
	if origin != "" {
		h.Set("Origin", origin)
	}
	return websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/control/machine/"+string(r)+"/logs", &websocket.DialOptions{HTTPHeader: h})
}

func readAll(ctx context.Context, c *websocket.Conn) []string {
	var got []string
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			return got
		}
		var m logMessage
		json.Unmarshal(data, &m)
		got = append(got, m.Type+": "+m.Message)
	}
}

func TestLogs(t *testing.T) {
	srv := newLogsAPI(t, Options{Logs: &fakeLogs{}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := dialLogs(ctx, srv, ref, "good", "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	got := readAll(ctx, c)
	want := []string{"stdout: listening on 8080", "stderr: Traceback", "system: program ended: exited with code 1", "system: VM is not running, past logs sent"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got\n%s", strings.Join(got, "\n"))
	}

	resp, body := getToken(t, srv.URL+"/control/machine/"+string(ref)+"/logs", "good")
	var lines []map[string]any
	if resp.StatusCode != 200 || json.Unmarshal([]byte(body), &lines) != nil || len(lines) != 2 || lines[1]["MESSAGE"] != "Traceback" {
		t.Errorf("past logs: %d %s", resp.StatusCode, body)
	}
	other := "0000000000000000000000000000000000000000000000000000000000000000"
	if resp, body := getToken(t, srv.URL+"/control/machine/"+other+"/logs", "good"); resp.StatusCode != 404 || !strings.Contains(body, "No virtual machine") {
		t.Errorf("unknown ref: %d %s", resp.StatusCode, body)
	}
}

// TestLogsNeedCredentials: the logs of a VM are its owner's and the
// operator's, not anyone's.
func TestLogsNeedCredentials(t *testing.T) {
	logs := &fakeLogs{}
	srv := newLogsAPI(t, Options{Logs: logs})
	for token, want := range map[string]int{"": 401, "forged": 401, "stranger": 403} {
		if resp, body := getToken(t, srv.URL+"/control/machine/"+string(ref)+"/logs", token); resp.StatusCode != want {
			t.Errorf("GET with token %q: %d %s", token, resp.StatusCode, body)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, resp, err := dialLogs(ctx, srv, ref, token, "")
		cancel()
		if err == nil {
			c.CloseNow()
		}
		if resp == nil || resp.StatusCode != want {
			t.Errorf("websocket with token %q: %v, %v", token, resp, err)
		}
	}
	if n := logs.calls.Load(); n != 0 {
		t.Errorf("the logs were read %d times for callers without credentials", n)
	}
	// A node with no credentials configured serves no logs.
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	open := httptest.NewServer(New(Options{Programs: pool.New(pool.Options{Log: log}), Logs: logs, Version: "test", Log: log}))
	defer open.Close()
	if resp, _ := getToken(t, open.URL+"/control/machine/"+string(ref)+"/logs", "good"); resp.StatusCode != 403 {
		t.Errorf("node without credentials: %d", resp.StatusCode)
	}
}

// TestLogsOrigin: a web page of another site cannot open a logs
// websocket unless the operator lists it; clients that send no Origin (the
// CLIs, aiohttp, the SDKs) and the node's own pages can.
func TestLogsOrigin(t *testing.T) {
	srv := newLogsAPI(t, Options{Logs: &fakeLogs{}, WebsocketOrigins: []string{"console.example", "*.aleph.example"}})
	host := strings.TrimPrefix(srv.URL, "http://")
	for origin, want := range map[string]bool{
		"":                              true,
		"http://" + host:                true,
		"https://console.example":       true,
		"https://app.aleph.example":     true,
		"https://evil.example":          false,
		"https://console.example.evil":  false,
		"null":                          false,
		"https://evil.example/?console": false,
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, resp, err := dialLogs(ctx, srv, ref, "good", origin)
		cancel()
		if err == nil {
			c.CloseNow()
		}
		if (err == nil) != want {
			t.Errorf("origin %q: accepted %v, want %v (%v)", origin, err == nil, want, err)
		}
		if !want && (resp == nil || resp.StatusCode != 403) {
			t.Errorf("origin %q: %v, want 403", origin, resp)
		}
	}
}

// blockingLogs follows until its client leaves.
type blockingLogs struct{ following atomic.Int32 }

func (b *blockingLogs) Follow(ctx context.Context, _ message.ItemHash, fn func(LogLine) error) (bool, bool, error) {
	b.following.Add(1)
	defer b.following.Add(-1)
	if err := fn(LogLine{Stream: "stdout", Text: "hello"}); err != nil {
		return true, false, err
	}
	<-ctx.Done()
	return true, false, ctx.Err()
}

func TestLogFollowersAreCapped(t *testing.T) {
	logs := &blockingLogs{}
	srv := newLogsAPI(t, Options{Logs: logs, MaxLogFollowers: 3, MaxLogFollowersPerVM: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	refs := []message.ItemHash{ref, ref, other, "c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2"}
	open := func(r message.ItemHash) (*websocket.Conn, int) {
		c, resp, err := dialLogs(ctx, srv, r, "good", "")
		if err != nil {
			if resp == nil {
				t.Fatal(err)
			}
			return nil, resp.StatusCode
		}
		if _, _, err := c.Read(ctx); err != nil { // the first line: it follows
			t.Fatal(err)
		}
		return c, 101
	}
	// Refused handshakes give their place back.
	for range 3 {
		if c, _, err := dialLogs(ctx, srv, ref, "good", "https://evil.example"); err == nil {
			c.CloseNow()
			t.Fatal("a foreign origin was accepted")
		}
	}
	var conns []*websocket.Conn
	for _, r := range refs[:3] {
		c, status := open(r)
		if status != 101 {
			t.Fatalf("follower of %s refused: %d", r[:6], status)
		}
		conns = append(conns, c)
	}
	if _, status := open(ref); status != http.StatusTooManyRequests {
		t.Errorf("third follower of one VM: %d, want 429", status)
	}
	if _, status := open(refs[3]); status != http.StatusTooManyRequests {
		t.Errorf("fourth follower on the node: %d, want 429", status)
	}
	// One leaves: its place is free again.
	conns[0].Close(websocket.StatusNormalClosure, "")
	for logs.following.Load() > 2 {
		time.Sleep(10 * time.Millisecond)
	}
	c, status := open(ref)
	if status != 101 {
		t.Fatalf("follower after one left: %d", status)
	}
	conns = append(conns[1:], c)
	for _, c := range conns {
		c.CloseNow()
	}
}

// consoleLogs serves the console file of one VM as the node does for
// instances.
type consoleLogs struct{ path string }

func (c consoleLogs) Follow(ctx context.Context, r message.ItemHash, fn func(LogLine) error) (bool, bool, error) {
	ended, err := console.Follow(ctx, c.path, console.DefaultLimits, func() bool { return false }, func(text string) error {
		return fn(LogLine{Stream: "console", Text: text})
	})
	return true, ended, err
}

// TestPastLogsOfAHugeConsole asks for the past logs of a VM whose console
// file is 2 GiB: the answer is bounded, and so is the memory the node
// allocates to make it.
func TestPastLogsOfAHugeConsole(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(2 << 30); err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("\nthe last line\n"), 2<<30)
	f.Close()
	srv := newLogsAPI(t, Options{Logs: consoleLogs{path}})

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	req, _ := http.NewRequest("GET", srv.URL+"/control/machine/"+string(ref)+"/logs", nil)
	req.Header.Set("X-Auth-Signature", "good")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	tail := &tailWriter{}
	n, err := io.Copy(tail, resp.Body)
	runtime.ReadMemStats(&after)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%d, %v", resp.StatusCode, err)
	}
	if !strings.Contains(string(tail.last), `"MESSAGE":"the last line"`) || !strings.HasSuffix(string(tail.last), "]\n") {
		t.Errorf("the answer does not end with the console's last line: %q", tail.last)
	}
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("answer %d bytes, allocated %d bytes", n, allocated)
	// NUL bytes are six in JSON: the last MiB of the console is at most
	// about 7 MiB of answer.
	if n > 8<<20 {
		t.Errorf("the answer has %d bytes", n)
	}
	if allocated > 64<<20 {
		t.Errorf("the node allocated %d bytes to answer", allocated)
	}
}

// tailWriter keeps the last bytes written to it.
type tailWriter struct{ last []byte }

func (w *tailWriter) Write(p []byte) (int, error) {
	w.last = append(w.last, p...)
	if len(w.last) > 256 {
		w.last = append([]byte(nil), w.last[len(w.last)-256:]...)
	}
	return len(p), nil
}

// A follower that sends a data message is closed with a policy violation
// and gives its place back at once: coder/websocket's CloseRead would wait
// 15 s on itself first (coder/websocket#429), holding the slot and the
// handler.
func TestLogFollowerSendingDataLeavesAtOnce(t *testing.T) {
	logs := &blockingLogs{}
	srv := newLogsAPI(t, Options{Logs: logs, MaxLogFollowers: 3, MaxLogFollowersPerVM: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := dialLogs(ctx, srv, ref, "good", "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	if _, _, err := c.Read(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.Write(ctx, websocket.MessageText, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Read(ctx); websocket.CloseStatus(err) != websocket.StatusPolicyViolation {
		t.Errorf("after a data message: %v, want a policy violation close", err)
	}
	for logs.following.Load() > 0 {
		if time.Since(start) > 3*time.Second {
			t.Fatal("the handler still follows 3 s after its client was closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	next, resp, err := dialLogs(ctx, srv, ref, "good", "")
	if err != nil {
		t.Fatalf("the next follower is refused: %v %v", resp, err)
	}
	next.CloseNow()
}

// floodLogs sends lines of 64 KiB until its client stops taking them.
type floodLogs struct{ following atomic.Int32 }

func (f *floodLogs) Follow(ctx context.Context, _ message.ItemHash, fn func(LogLine) error) (bool, bool, error) {
	f.following.Add(1)
	defer f.following.Add(-1)
	line := strings.Repeat("x", 64<<10)
	for {
		if err := fn(LogLine{Stream: "stdout", Text: line}); err != nil {
			return true, false, err
		}
	}
}

// A follower that stops reading is dropped once one line waits longer
// than the write timeout: it would otherwise hold its place, a goroutine
// and a connection for as long as it keeps the connection open.
func TestLogFollowerThatStopsReadingIsDropped(t *testing.T) {
	for _, route := range []string{"logs", "stream_logs"} {
		t.Run(route, func(t *testing.T) {
			logs := &floodLogs{}
			srv := newLogsAPI(t, Options{Logs: logs, Limits: Limits{WriteTimeout: 200 * time.Millisecond}, MaxLogFollowersPerVM: 1,
				OwnerAuth: auth.NewOwner(auth.OwnerOptions{Domain: "127.0.0.1"}), Machines: fakeMachines{ref: {Owner: ownerAddress, Type: TypeInstance}}})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var c *websocket.Conn
			if route == "logs" {
				var err error
				if c, _, err = dialLogs(ctx, srv, ref, "good", ""); err != nil {
					t.Fatal(err)
				}
			} else {
				owner := (&ownerRig{srv: srv}).client(ownerKey, alephsdk.Python)
				var err error
				if c, _, err = websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/control/machine/"+string(ref)+"/stream_logs", nil); err != nil {
					t.Fatal(err)
				}
				if err := c.Write(ctx, websocket.MessageText, owner.AuthFrame(string(ref))); err != nil {
					t.Fatal(err)
				}
			}
			defer c.CloseNow()
			// The client reads nothing more.
			start := time.Now()
			for logs.following.Load() == 0 && time.Since(start) < 5*time.Second {
				time.Sleep(10 * time.Millisecond)
			}
			for logs.following.Load() > 0 {
				if time.Since(start) > 10*time.Second {
					t.Fatal("the node still writes to a client that reads nothing, 10 s on")
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}
