package diagnostic

import (
	"archive/zip"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	diagsrc "github.com/alephvm/alephvm/examples/diagnostic"
	"github.com/alephvm/alephvm/internal/teststore"
	"github.com/alephvm/alephvm/message"
)

func TestDeploy(t *testing.T) {
	s, _ := teststore.Open(t, t.TempDir())
	ctx := context.Background()
	runtimeFile := filepath.Join(t.TempDir(), "runtime.squashfs")
	os.WriteFile(runtimeFile, []byte("a runtime"), 0o644)
	rt, err := s.AddFile(ctx, runtimeFile)
	if err != nil {
		t.Fatal(err)
	}
	targets := Targets{DNSName: "example.test", IPv4URLs: []string{"http://192.0.2.1/", "http://192.0.2.2/"}, MessageHash: strings.Repeat("ab", 32)}
	ref, err := Deploy(ctx, s, rt.Ref, targets)
	if err != nil {
		t.Fatal(err)
	}
	again, err := Deploy(ctx, s, rt.Ref, targets)
	if err != nil || again != ref {
		t.Fatalf("deployed again: %s %v, want %s", again, err, ref)
	}
	other, err := Deploy(ctx, s, rt.Ref, Targets{})
	if err != nil || other == ref {
		t.Fatalf("other targets gave %s %v, want another ref than %s", other, err, ref)
	}

	msg, raw, err := s.Message(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := message.Parse(raw); err != nil {
		t.Fatalf("the message does not validate: %v\n%s", err, raw)
	}
	c := msg.Content.(*message.ProgramContent)
	if c.Code.Entrypoint != "main:app" || c.Runtime.Ref != rt.Ref || !c.On.HTTP || !c.Environment.Internet {
		t.Errorf("content: %+v", c)
	}
	if c.Variables["DIAG_DNS_NAME"] != "example.test" || c.Variables["DIAG_IPV4_URLS"] != "http://192.0.2.1/,http://192.0.2.2/" ||
		c.Variables["DIAG_STATE_DIR"] != StateMount || c.Variables["DIAG_MESSAGE_HASH"] != targets.MessageHash {
		t.Errorf("variables: %v", c.Variables)
	}
	if _, ok := c.Variables["DIAG_IPV6_URLS"]; ok {
		t.Errorf("an empty target is set: %v", c.Variables)
	}
	if len(c.Volumes) != 1 || c.Volumes[0].Kind() != message.VolumePersistent || *c.Volumes[0].Mount != StateMount {
		t.Errorf("volumes: %+v", c.Volumes)
	}

	item, err := s.Fetch(ctx, c.Code.Ref, false)
	if err != nil {
		t.Fatal(err)
	}
	defer item.Release()
	zr, err := zip.OpenReader(item.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	f, err := zr.Open("main.py")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(f)
	if !bytes.Equal(got, diagsrc.Source) {
		t.Error("the stored code is not the diagnostic program")
	}
}

// fakeProgram answers as the diagnostic program does through the node,
// except for the paths in broken, which answer 503.
func fakeProgram(t *testing.T, ref string, broken map[string]bool, calls *atomic.Int32) *httptest.Server {
	var mu sync.Mutex
	counter := 0
	answers := map[string]any{
		"/":               map[string]any{"Example": "example_fastapi"},
		"/lifespan":       map[string]any{"Lifespan": true},
		"/environ":        map[string]any{"ALEPH_API_HOST": "http://localhost", "ALEPH_API_UNIX_SOCKET": "/tmp/socat-socket", "ALEPH_REMOTE_CRYPTO_HOST": "http://localhost", "ALEPH_REMOTE_CRYPTO_UNIX_SOCKET": "/tmp/socat-socket", "ALEPH_ADDRESS_TO_USE": "0x1"},
		"/messages":       map[string]any{"Messages": map[string]any{"messages": []any{map[string]any{"item_hash": "ab"}}}},
		"/dns":            map[string]any{"ipv4": "192.0.2.1", "ipv6": "2001:db8::1"},
		"/ip/4":           map[string]any{"result": true, "headers": map[string]any{}},
		"/internet":       map[string]any{"result": 200, "headers": map[string]any{}},
		"/cache/set/a/42": true,
		"/cache/get/a":    "42",
		"/cache/keys":     []string{"a"},
		"/get_a_message":  map[string]any{"item_hash": "ab"},
	}
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		path, ok := strings.CutPrefix(r.URL.Path, "/vm/"+ref)
		if !ok {
			http.NotFound(w, r)
			return
		}
		if path == "" {
			path = "/"
		}
		if path == "/" && calls != nil {
			calls.Add(1)
			time.Sleep(100 * time.Millisecond)
		}
		if broken[path] {
			http.Error(w, `{"result": false}`, http.StatusServiceUnavailable)
			return
		}
		switch path {
		case "/raise":
			http.Error(w, "Traceback (most recent call last):\n  CustomError: Whoops", http.StatusInternalServerError)
			return
		case "/state/increment":
			mu.Lock()
			counter++
			json.NewEncoder(w).Encode(map[string]int{"counter": counter})
			mu.Unlock()
			return
		}
		a, ok := answers[path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(a)
	}))
}

func TestCheck(t *testing.T) {
	ref := message.ItemHash(strings.Repeat("cd", 32))
	for _, tc := range []struct {
		name   string
		broken map[string]bool
		retro  bool
		want   string
		passed bool
		failed []string
	}{
		{
			name:   "healthy",
			want:   `{"index": true, "environ": true, "messages": true, "dns": true, "ipv4": true, "internet": true, "cache": true, "persistent_storage": true, "error_handling": true, "get_a_message": true, "lifespan": true}`,
			passed: true,
		},
		{
			name:   "retro-compatibility",
			retro:  true,
			want:   `{"index": true, "environ": true, "messages": true, "dns": true, "ipv4": true, "internet": true, "cache": true, "persistent_storage": true, "error_handling": true}`,
			passed: true,
		},
		{
			name:   "no internet",
			broken: map[string]bool{"/internet": true, "/ip/4": true, "/dns": true},
			want:   `{"index": true, "environ": true, "messages": true, "dns": false, "ipv4": false, "internet": false, "cache": true, "persistent_storage": true, "error_handling": true, "get_a_message": true, "lifespan": true}`,
			failed: []string{"dns", "ipv4", "internet"},
		},
		{
			name:   "optional checks fail",
			broken: map[string]bool{"/messages": true, "/cache/get/a": true, "/get_a_message": true},
			want:   `{"index": true, "environ": true, "messages": false, "dns": true, "ipv4": true, "internet": true, "cache": false, "persistent_storage": true, "error_handling": true, "get_a_message": false, "lifespan": true}`,
			passed: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := fakeProgram(t, string(ref), tc.broken, nil)
			defer srv.Close()
			c := &Checker{Node: srv.URL}
			r := c.Run(context.Background(), ref, tc.retro)
			if got := r.Body(); string(got) != tc.want {
				t.Errorf("JSON:\n got %s\nwant %s", got, tc.want)
			}
			if r.Passed != tc.passed || strings.Join(r.Failed(), ",") != strings.Join(tc.failed, ",") {
				t.Errorf("passed %v failed %v, want %v %v", r.Passed, r.Failed(), tc.passed, tc.failed)
			}
		})
	}
}

func TestCheckUnreachableNode(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	r := (&Checker{Node: url}).Run(context.Background(), message.ItemHash(strings.Repeat("cd", 32)), false)
	got := r.Body()
	if r.Err == nil || r.Passed || !strings.HasPrefix(string(got), `{"error": "the node's own program route: `) {
		t.Errorf("unreachable node: %s %+v", got, r)
	}
}

func TestConcurrentChecksShareOneRun(t *testing.T) {
	ref := message.ItemHash(strings.Repeat("cd", 32))
	var calls atomic.Int32
	srv := fakeProgram(t, string(ref), nil, &calls)
	defer srv.Close()
	c := &Checker{Node: srv.URL}
	var wg sync.WaitGroup
	for range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r := c.Run(context.Background(), ref, false); !r.Passed {
				t.Errorf("failed: %+v", r)
			}
		}()
	}
	wg.Wait()
	if n := calls.Load(); n != 1 {
		t.Errorf("%d runs for 5 concurrent callers, want 1", n)
	}
}

func TestNode(t *testing.T) {
	ref := message.ItemHash(strings.Repeat("cd", 32))
	srv := fakeProgram(t, string(ref), map[string]bool{"/internet": true}, nil)
	defer srv.Close()
	n := &Node{Checker: &Checker{Node: srv.URL}, Ref: ref}
	if _, _, ok := n.Last(); ok {
		t.Error("a last result before any check")
	}
	body, passed := n.CheckFastAPI(context.Background(), false, false)
	if passed || !strings.Contains(string(body), `"internet": false`) {
		t.Errorf("check: %v %s", passed, body)
	}
	if r, at, ok := n.Last(); !ok || at.IsZero() || strings.Join(r.Failed(), ",") != "internet" {
		t.Errorf("last: %+v %v %v", r, at, ok)
	}
	body, passed = n.CheckFastAPI(context.Background(), true, true)
	if passed || !strings.Contains(string(body), "LEGACY_CHECK_FASTAPI_VM_ID") {
		t.Errorf("legacy without a program: %v %s", passed, body)
	}
}

func TestNodeDeploysAtTheFirstCheck(t *testing.T) {
	ref := message.ItemHash(strings.Repeat("cd", 32))
	srv := fakeProgram(t, string(ref), nil, nil)
	defer srv.Close()
	deploys, fail := 0, true
	n := &Node{Checker: &Checker{Node: srv.URL}, Deploy: func(context.Context) (message.ItemHash, error) {
		deploys++
		if fail {
			return "", io.ErrUnexpectedEOF
		}
		return ref, nil
	}}
	body, passed := n.CheckFastAPI(context.Background(), false, false)
	if passed || !strings.Contains(string(body), "deploy the node's diagnostic program") {
		t.Errorf("failed deploy: %v %s", passed, body)
	}
	fail = false
	for range 2 {
		if body, passed := n.CheckFastAPI(context.Background(), false, false); !passed {
			t.Errorf("after a deploy: %s", body)
		}
	}
	if deploys != 2 {
		t.Errorf("%d deploys, want 2 (one failed, one kept)", deploys)
	}
}
