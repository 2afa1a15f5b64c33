package api

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// tokenAuth accepts X-Auth-Signature: good and refuses every other call.
type tokenAuth struct{}

type authError struct{ status int }

func (e authError) Error() string   { return "Authentication token received is invalid" }
func (e authError) HTTPStatus() int { return e.status }

func (tokenAuth) Verify(r *http.Request) ([]byte, error) {
	switch r.Header.Get("X-Auth-Signature") {
	case "good":
		return io.ReadAll(r.Body)
	case "stranger":
		return nil, authError{http.StatusForbidden}
	}
	return nil, authError{http.StatusUnauthorized}
}

func post(t *testing.T, u, token, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", u, strings.NewReader(body))
	if token != "" {
		req.Header.Set("X-Auth-Signature", token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

const other = message.ItemHash("b236db23bf5ad005ad7f5d82eed08a68a925020f0755b2a59c03f784499198eb")

type fakeInstances struct {
	mu      sync.Mutex
	running map[message.ItemHash]bool
	runs    map[message.ItemHash]uint64
	lastRun uint64
	calls   []string
	failing map[message.ItemHash]bool
}

// seen returns the calls so far; reset forgets them. The API may call
// the instances from goroutines of its own (an expiry's stop).
func (f *fakeInstances) seen() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeInstances) reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = nil
}

func (f *fakeInstances) record(op string, ref message.ItemHash) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, op+" "+string(ref)[:6])
}

func (f *fakeInstances) Start(_ context.Context, ref message.ItemHash) error {
	f.record("start", ref)
	if f.failing[ref] {
		return errors.New("no base image")
	}
	f.mu.Lock()
	if !f.running[ref] {
		f.lastRun++
		f.runs[ref] = f.lastRun
	}
	f.running[ref] = true
	f.mu.Unlock()
	return nil
}

func (f *fakeInstances) Stop(_ context.Context, ref message.ItemHash) (bool, error) {
	f.record("stop", ref)
	f.mu.Lock()
	defer f.mu.Unlock()
	was := f.running[ref]
	delete(f.running, ref)
	return was, nil
}
func (f *fakeInstances) Reboot(_ context.Context, ref message.ItemHash) error {
	f.record("reboot", ref)
	return nil
}
func (f *fakeInstances) Erase(_ context.Context, ref message.ItemHash) error {
	f.record("erase", ref)
	return nil
}
func (f *fakeInstances) Reinstall(_ context.Context, ref message.ItemHash, eraseVolumes bool) error {
	if eraseVolumes {
		f.record("reinstall+volumes", ref)
	} else {
		f.record("reinstall", ref)
	}
	return nil
}
func (f *fakeInstances) UpdatePorts(_ context.Context, ref message.ItemHash) (bool, error) {
	f.record("update", ref)
	return f.Running(ref), nil
}
func (f *fakeInstances) Running(ref message.ItemHash) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.running[ref]
}

func (f *fakeInstances) Run(ref message.ItemHash) (uint64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.runs[ref], f.running[ref]
}

func (f *fakeInstances) StopRun(ctx context.Context, ref message.ItemHash, run uint64) (bool, error) {
	if r, ok := f.Run(ref); !ok || r != run {
		return false, nil
	}
	return f.Stop(ctx, ref)
}

func (f *fakeInstances) Allocate(ctx context.Context, desired []message.ItemHash) AllocationResult {
	res := AllocationResult{Success: true, Successful: []string{}, Failing: []string{}, Stopped: []string{}, Errors: map[string]string{}}
	for _, ref := range desired {
		if err := f.Start(ctx, ref); err != nil {
			res.Success = false
			res.Failing = append(res.Failing, string(ref))
			res.Errors[string(ref)] = err.Error()
		} else {
			res.Successful = append(res.Successful, string(ref))
		}
	}
	return res
}

func (f *fakeInstances) Statuses(context.Context) ([]InstanceStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []InstanceStatus
	for ref := range f.running {
		out = append(out, InstanceStatus{Ref: ref, Running: true, StartedAt: time.Unix(1700000000, 0), VCPUs: 1, MemoryMiB: 512,
			IPv4Network: "172.16.5.0/24", IPv4: "172.16.5.2", HostIPv4: "172.16.5.1",
			MappedPorts: map[string]MappedPort{"22": {Host: 24000, TCP: true}}})
	}
	return out, nil
}

func newControlAPI(t *testing.T) (*httptest.Server, *fakeInstances) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f := &fakeInstances{running: map[message.ItemHash]bool{}, runs: map[message.ItemHash]uint64{}, failing: map[message.ItemHash]bool{other: true}}
	srv := httptest.NewServer(New(Options{Programs: pool.New(pool.Options{Log: log}), Instances: f, Auth: tokenAuth{}, Version: "test", Log: log}))
	t.Cleanup(srv.Close)
	return srv, f
}

func TestAllocationsNeedCredentials(t *testing.T) {
	srv, f := newControlAPI(t)
	body := `{"persistent_vms":[],"instances":["` + string(ref) + `"]}`
	for token, want := range map[string]int{"": 401, "forged": 401, "stranger": 403} {
		if status, b := post(t, srv.URL+"/control/allocations", token, body); status != want {
			t.Errorf("token %q: %d %s", token, status, b)
		}
	}
	for _, path := range []string{"/control/allocation/notify", "/control/machine/" + string(ref) + "/reboot", "/control/machine/" + string(ref) + "/erase"} {
		if status, _ := post(t, srv.URL+path, "forged", `{"instance":"`+string(ref)+`"}`); status != 401 {
			t.Errorf("%s: %d", path, status)
		}
	}
	if len(f.calls) != 0 {
		t.Errorf("refused calls changed something: %v", f.calls)
	}
}

func TestAllocations(t *testing.T) {
	srv, f := newControlAPI(t)
	status, b := post(t, srv.URL+"/control/allocations", "good", `{"persistent_vms":[],"instances":["`+string(ref)+`"]}`)
	var res AllocationResult
	if status != 200 || json.Unmarshal([]byte(b), &res) != nil || !res.Success || len(res.Successful) != 1 {
		t.Errorf("%d %s", status, b)
	}
	status, b = post(t, srv.URL+"/control/allocations", "good", `{"instances":["`+string(ref)+`","`+string(other)+`"]}`)
	if status != 207 || !strings.Contains(b, "no base image") {
		t.Errorf("partial: %d %s", status, b)
	}
	if status, b = post(t, srv.URL+"/control/allocations", "good", `{"instances":["`+string(other)+`"]}`); status != 503 {
		t.Errorf("all failing: %d %s", status, b)
	}
	if status, _ = post(t, srv.URL+"/control/allocations", "good", `{"instances":["nope"]}`); status != 400 {
		t.Errorf("bad ref: %d", status)
	}

	_, body := get(t, srv.URL+"/v2/about/executions/list", "")
	if !strings.Contains(body, `"mapped_ports":{"22":{"host":24000,"tcp":true,"udp":false}}`) || !strings.Contains(body, `"vm_type":"instance"`) {
		t.Errorf("list: %s", body)
	}
	for _, op := range []string{"reboot", "erase", "start"} {
		if status, b := post(t, srv.URL+"/control/machine/"+string(ref)+"/"+op, "good", ""); status != 200 {
			t.Errorf("%s: %d %s", op, status, b)
		}
	}
	if status, b := post(t, srv.URL+"/control/machine/"+string(ref)+"/expire", "good", `{"timeout":0}`); status != 200 || !strings.Contains(b, "Expiring") {
		t.Errorf("expire: %d %s", status, b)
	}
	deadline := time.Now().Add(5 * time.Second)
	for f.Running(ref) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if f.Running(ref) {
		t.Error("expire did not stop the instance")
	}
	if status, _ := post(t, srv.URL+"/control/machine/"+string(ref)+"/expire", "good", `{"timeout":-1}`); status != 400 {
		t.Errorf("negative timeout: %d", status)
	}
}

// TestExpireTimeouts: a timeout must be a finite number of seconds within
// MaxExpireTimeout; anything else is refused and schedules nothing.
func TestExpireTimeouts(t *testing.T) {
	srv, f := newControlAPI(t)
	if err := f.Start(context.Background(), ref); err != nil {
		t.Fatal(err)
	}
	u := srv.URL + "/control/machine/" + string(ref) + "/expire"
	for _, c := range []struct{ query, body string }{
		{"", `{"timeout":-1}`}, {"", `{"timeout":-0.000001}`}, {"", `{"timeout":1e300}`}, {"", `{"timeout":1e400}`},
		{"", `{"timeout":2592001}`}, {"", `{"timeout":"60"}`}, {"", `{"timeout":NaN}`}, {"", `{"timeout":Infinity}`},
		{"?timeout=NaN", ""}, {"?timeout=Inf", ""}, {"?timeout=-Inf", ""}, {"?timeout=1e300", ""}, {"?timeout=-5", ""},
		{"?timeout=0x10", ""}, {"?timeout=1e3000", ""},
	} {
		if status, b := post(t, u+c.query, "good", c.body); status != 400 {
			t.Errorf("expire %s %s: %d %s", c.query, c.body, status, b)
		}
	}
	if status, b := post(t, u, "good", `{"timeout":2592000}`); status != 200 {
		t.Errorf("the longest timeout: %d %s", status, b)
	}
	if !f.Running(ref) {
		t.Error("a refused expiry stopped the instance")
	}
}

// TestExpireEndsWithItsRun: an expiry set on one run of an instance does
// not stop a later run, and a later expiry replaces an earlier one.
func TestExpireEndsWithItsRun(t *testing.T) {
	srv, f := newControlAPI(t)
	ctx := context.Background()
	u := srv.URL + "/control/machine/" + string(ref) + "/expire"
	f.Start(ctx, ref)
	if status, b := post(t, u, "good", `{"timeout":0.2}`); status != 200 {
		t.Fatalf("expire: %d %s", status, b)
	}
	f.Stop(ctx, ref)
	f.Start(ctx, ref) // a new run
	time.Sleep(600 * time.Millisecond)
	if !f.Running(ref) {
		t.Error("the expiry of the earlier run stopped the new one")
	}

	// Replaced by a later, longer expiry: the first one never fires.
	post(t, u, "good", `{"timeout":0.2}`)
	post(t, u, "good", `{"timeout":3600}`)
	time.Sleep(600 * time.Millisecond)
	if !f.Running(ref) {
		t.Error("a replaced expiry stopped the instance")
	}
	post(t, u, "good", `{"timeout":0}`)
	for deadline := time.Now().Add(5 * time.Second); f.Running(ref) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if f.Running(ref) {
		t.Error("expire did not stop the instance")
	}
}
