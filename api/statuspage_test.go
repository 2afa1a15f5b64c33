package api

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vms "github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// fakeStatus is a node whose host name counts the times it was asked, so
// that each rendering of the page differs.
type fakeStatus struct {
	renders atomic.Int64
	err     error
}

func (f *fakeStatus) NodeStatus(context.Context) (NodeStatus, error) {
	n := f.renders.Add(1)
	return NodeStatus{
		Hostname:  fmt.Sprintf("render-%d", n),
		StartedAt: time.Now().Add(-26 * time.Hour),
		Memory:    Usage{Used: 2560 << 20, Capacity: 8 << 30},
		VCPUs:     Usage{Used: 3, Capacity: 8},
		Disk:      Usage{Used: 40 << 30, Capacity: 100 << 30},
		RecentStarts: []vms.ColdStart{
			{Ref: ref, Type: vms.TypeProgram, At: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Total: 4200 * time.Millisecond,
				Phases: []vms.Phase{{Name: "network", Took: 3 * time.Millisecond}, {Name: "ready", Took: 4100 * time.Millisecond}}},
			{Ref: other, Type: vms.TypeInstance, At: time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC), Total: time.Second,
				Phases: []vms.Phase{{Name: "fetch", Took: time.Second}}, Err: errors.New("base image <img src=x> not found")},
		},
	}, f.err
}

type fakeChecks []CheckResult

func (f fakeChecks) CheckResults(context.Context) []CheckResult { return f }

// newStatusAPI serves a node with one program (booted by a request), one
// instance running with a forward, the fake status and checks.
func newStatusAPI(t *testing.T, status StatusSource, checks SelfChecks, metrics http.Handler) (*httptest.Server, *observed) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	l := &launcher{handler: echoHandler(), memory: 128, timeout: 5 * time.Second}
	p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
	inst := &fakeInstances{running: map[message.ItemHash]bool{other: true}, runs: map[message.ItemHash]uint64{}, failing: map[message.ItemHash]bool{}}
	obs := &observed{}
	var opts = Options{Programs: p, Instances: inst, Auth: tokenAuth{}, Domain: "node.example", Version: "9.9.9", Log: log,
		Observer: obs, Metrics: metrics}
	if status != nil {
		opts.Status = status
	}
	if checks != nil {
		opts.Checks = checks
	}
	srv := httptest.NewServer(New(opts))
	t.Cleanup(func() { srv.Close(); p.Shutdown(context.Background()) })
	return srv, obs
}

// observed records what the API tells its observer.
type observed struct {
	mu          sync.Mutex
	requests    []int
	latencies   []time.Duration
	allocations []string
}

func (o *observed) ProgramRequest(code int, took time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.requests = append(o.requests, code)
	o.latencies = append(o.latencies, took)
}

func (o *observed) AllocationCall(route string, code int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.allocations = append(o.allocations, fmt.Sprintf("%s %d", route, code))
}

// inlineHash is the CSP source of the text of the page's one element tag.
func inlineHash(t *testing.T, page, tag string) string {
	t.Helper()
	m := regexp.MustCompile(`(?s)<`+tag+`>(.*?)</`+tag+`>`).FindAllStringSubmatch(page, -1)
	if len(m) != 1 {
		t.Fatalf("%d <%s> elements", len(m), tag)
	}
	sum := sha256.Sum256([]byte(m[0][1]))
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

func TestStatusPage(t *testing.T) {
	checks := fakeChecks{
		{Name: "host", Passed: true, Detail: "egress, DNS and HTTP over IPv4", CheckedAt: time.Now()},
		{Name: "fastapi", Passed: false, Detail: `internet: <script>alert("x")</script> unreachable`},
	}
	srv, _ := newStatusAPI(t, &fakeStatus{}, checks, nil)
	if resp, body := get(t, srv.URL+"/vm/"+string(ref)+"/", ""); resp.StatusCode != 200 {
		t.Fatalf("boot the program: %d %s", resp.StatusCode, body)
	}
	resp, page := get(t, srv.URL+"/", "")
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("%d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	csp := resp.Header.Get("Content-Security-Policy")
	for _, want := range []string{"default-src 'none'", "script-src " + inlineHash(t, page, "script"), "style-src " + inlineHash(t, page, "style"),
		"connect-src 'self'", "frame-ancestors 'none'"} {
		if !strings.Contains(csp, want) {
			t.Errorf("CSP %q lacks %q", csp, want)
		}
	}
	if strings.Contains(csp, "unsafe") || strings.Contains(page, " style=") || strings.Contains(page, "<script src") || strings.Contains(page, "http://") || strings.Contains(page, "https://") {
		t.Error("the page relies on something its policy does not allow, or on another site")
	}
	for _, want := range []string{
		"node.example", "alephvm <strong>9.9.9</strong>", "render-1", "up 1d 2h", "2 of 2 VMs running",
		// capacity
		"<strong>2.5 GiB</strong> used of 8.0 GiB · 5.5 GiB free", "<strong>3</strong> used of 8 · 5 free", `value="0.312"`,
		// the VMs, with their resources, addresses, ports and uptime
		`data-ref="` + string(ref) + `"`, `data-ref="` + string(other) + `"`, "172.16.4.2", "172.16.5.2", "24000-&gt;22/tcp", "512.0 MiB", "128.0 MiB",
		`<span class="state running">running</span>`,
		// the cold starts, by phase
		"network <strong>3 ms</strong>", "ready <strong>4100 ms</strong>", "4200 ms", "base image &lt;img src=x&gt; not found",
		// the checks, escaped
		"1 failing", "fastapi", `internet: &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; unreachable`,
		// without JavaScript
		`<noscript><meta http-equiv="refresh" content="5"></noscript>`,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
	if strings.Contains(page, "<img src=x>") || strings.Contains(page, `<script>alert`) {
		t.Error("a value was not escaped")
	}
	for h, want := range map[string]string{"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Cache-Control": "no-store"} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("%s: %q", h, got)
		}
	}
	// The uptime of the instance that started at 1700000000.
	if !regexp.MustCompile(`<td class="num">\d+d \d+h</td>`).MatchString(page) {
		t.Error("no uptime in days")
	}

	// HEAD: the headers only.
	req, _ := http.NewRequest("HEAD", srv.URL+"/", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 || resp.ContentLength > 0 {
		t.Errorf("HEAD: %v %v", resp, err)
	}
}

func TestStatusPageWithNothingWired(t *testing.T) {
	srv, _ := newStatusAPI(t, nil, nil, nil)
	resp, page := get(t, srv.URL+"/", "")
	if resp.StatusCode != 200 {
		t.Fatalf("%d", resp.StatusCode)
	}
	for _, want := range []string{"This node runs no self-checks.", "No VM has started since the node did.", "1 of 1 VM running"} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
	if strings.Contains(page, "Capacity") {
		t.Error("a capacity without a source")
	}
	srv, _ = newStatusAPI(t, &fakeStatus{err: errors.New("database is locked")}, fakeChecks{}, nil)
	_, page = get(t, srv.URL+"/", "")
	for _, want := range []string{"No self-check has run yet.", "Part of the node's state could not be read: database is locked"} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
}

func TestOwnPagesOnOwnNamesOnly(t *testing.T) {
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "alephvm_vms 1\n") })
	srv, _ := newStatusAPI(t, nil, nil, metrics)
	label, _ := LabelFromRef(ref)
	for _, tc := range []struct{ host, path, want string }{
		{"node.example", "/metrics", "alephvm_vms 1\n"},
		{"", "/metrics", "alephvm_vms 1\n"}, // by address
		{label + ".node.example", "/metrics", "GET /metrics?"},
		{label + ".node.example", "/", "GET /?"},
	} {
		resp, body := get(t, srv.URL+tc.path, tc.host)
		if resp.StatusCode != 200 || body != tc.want {
			t.Errorf("%s%s: %d %q, want %q", tc.host, tc.path, resp.StatusCode, body, tc.want)
		}
	}
	srv, _ = newStatusAPI(t, nil, nil, nil)
	if resp, _ := get(t, srv.URL+"/metrics", ""); resp.StatusCode != 404 {
		t.Errorf("/metrics without metrics: %d", resp.StatusCode)
	}
	req, _ := http.NewRequest("POST", srv.URL+"/", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 404 {
		t.Errorf("POST /: %v %v", resp, err)
	}
}

func TestObserverCountsRequests(t *testing.T) {
	srv, obs := newStatusAPI(t, nil, nil, nil)
	get(t, srv.URL+"/vm/"+string(ref)+"/", "")
	get(t, srv.URL+"/vm/not-a-hash/", "")
	req, _ := http.NewRequest("POST", srv.URL+"/control/allocations", strings.NewReader(`{}`))
	req.Header.Set("X-Auth-Signature", "wrong")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if fmt.Sprint(obs.requests) != "[200 400]" || obs.latencies[0] <= 0 {
		t.Errorf("program requests: %v %v", obs.requests, obs.latencies)
	}
	if fmt.Sprint(obs.allocations) != "[allocations 401]" {
		t.Errorf("allocation calls: %v", obs.allocations)
	}
}

// TestStatusPageRefreshesInChromium loads the page in Debian's headless
// chromium: its script runs under the page's policy and replaces the
// content with fresh renderings, without a reload.
func TestStatusPageRefreshesInChromium(t *testing.T) {
	testenv.Chromium(t)
	status := &fakeStatus{}
	srv, _ := newStatusAPI(t, status, fakeChecks{{Name: "host", Passed: true, Detail: "ok"}}, nil)
	get(t, srv.URL+"/vm/"+string(ref)+"/", "")
	// 12 s of the page's time: two refreshes.
	dom, log := testenv.HeadlessDOM(t, srv.URL+"/", 12*time.Second)
	refreshes := regexp.MustCompile(`data-refreshes="(\d+)"`).FindStringSubmatch(dom)
	if refreshes == nil || refreshes[1] < "2" {
		t.Fatalf("the page did not refresh twice (refreshes %v); chromium said:\n%s\nDOM:\n%s", refreshes, log, dom)
	}
	// One load and two refreshes rendered the page; the DOM is the last.
	if !strings.Contains(dom, "render-3") || strings.Contains(dom, "render-1") || !strings.Contains(dom, `class="js"`) {
		t.Errorf("the content is not the refreshed one (rendered %d times):\n%s", status.renders.Load(), dom)
	}
	if strings.Contains(log, "Content Security Policy") || strings.Contains(log, "Refused") {
		t.Errorf("the policy refused something:\n%s", log)
	}
	if path := testenv.Artifact(t, "status-page-unit.png"); path != "" {
		testenv.Screenshot(t, srv.URL+"/", path, 1280, 900, time.Second)
		t.Logf("screenshot: %s", path)
	}
	if os.Getenv("ALEPHVM_TEST_ARTIFACTS") == "" {
		t.Log("ALEPHVM_TEST_ARTIFACTS is not set: no screenshot saved")
	}
}
