package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// fakeAPI is a Firecracker API server on a unix socket that checks every
// request against the API spec: the path and method exist, the body is a
// valid instance of the operation's body schema. It answers as Firecracker
// does, and keeps the VM's state so that pause and resume show.
type fakeAPI struct {
	t      *testing.T
	spec   *apiSpec
	socket string

	mu       sync.Mutex
	state    string
	requests []string // "METHOD /path body"
	fail     string   // fault_message to answer every request with, if set
}

func newFakeAPI(t *testing.T, spec *apiSpec, socket string) *fakeAPI {
	f := &fakeAPI{t: t, spec: spec, socket: socket, state: StateRunning}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: f}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return f
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.requests = append(f.requests, strings.TrimSpace(r.Method+" "+r.URL.Path+" "+string(body)))
	for _, e := range f.spec.checkRequest(r.Method, r.URL.Path, body) {
		f.t.Errorf("request %s %s: %s", r.Method, r.URL.Path, e)
	}
	answer := func(status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		if v != nil {
			json.NewEncoder(w).Encode(v)
		}
	}
	if f.fail != "" {
		answer(400, map[string]string{"fault_message": f.fail})
		return
	}
	switch r.Method + " " + r.URL.Path {
	case "GET /":
		info := InstanceInfo{ID: "vm1", State: f.state, VMMVersion: "1.16.1", AppName: "Firecracker"}
		data, _ := json.Marshal(info)
		var v any
		json.Unmarshal(data, &v)
		for _, e := range f.spec.check("InstanceInfo", f.spec.Definitions["InstanceInfo"], v) {
			f.t.Errorf("fake answer: %s", e)
		}
		answer(200, info)
	case "PATCH /vm":
		var b struct{ State string }
		json.Unmarshal(body, &b)
		f.state = map[string]string{"Paused": StatePaused, "Resumed": StateRunning}[b.State]
		answer(204, nil)
	default:
		answer(204, nil)
	}
}

// checkRequest validates a request against the spec's paths.
func (s *apiSpec) checkRequest(method, path string, body []byte) []string {
	ops, ok := s.Paths[path]
	if !ok {
		ops, ok = s.Paths[s.templatePath(path)]
	}
	if !ok {
		return []string{"no such path in the API"}
	}
	op, ok := ops[strings.ToLower(method)]
	if !ok {
		return []string{"no such method for this path"}
	}
	var errs []string
	for _, p := range op.Parameters {
		if p.In != "body" {
			continue
		}
		if len(body) == 0 {
			if p.Required {
				errs = append(errs, "body required")
			}
			continue
		}
		var v any
		if err := json.Unmarshal(body, &v); err != nil {
			return append(errs, "body is not JSON: "+err.Error())
		}
		errs = append(errs, s.check("body", p.Schema, v)...)
	}
	return errs
}

// templatePath is the spec's path of a concrete one ("/drives/rootfs" is
// "/drives/{drive_id}"), or path itself.
func (s *apiSpec) templatePath(path string) string {
	parts := strings.Split(path, "/")
	for p := range s.Paths {
		tp := strings.Split(p, "/")
		if len(tp) != len(parts) {
			continue
		}
		match := true
		for i := range tp {
			if tp[i] != parts[i] && !(strings.HasPrefix(tp[i], "{") && strings.HasSuffix(tp[i], "}")) {
				match = false
				break
			}
		}
		if match {
			return p
		}
	}
	return path
}

// The snapshot calls, as a template's save and a program VM's restore make
// them, are requests the API accepts, in the order Firecracker needs.
func TestSnapshotCallsAgainstSpec(t *testing.T) {
	spec := loadSpec(t)
	socket := filepath.Join(t.TempDir(), "api.sock")
	fake := newFakeAPI(t, spec, socket)
	c := NewClient(socket)
	defer c.Close()
	ctx := context.Background()
	for _, call := range []func() error{
		func() error { return c.Pause(ctx) },
		func() error { return c.CreateSnapshot(ctx, "/templates/t/state", "/templates/t/memory") },
		func() error {
			return c.LoadSnapshot(ctx, SnapshotLoad{StatePath: "/templates/t/state", MemPath: "/templates/t/memory",
				Taps: map[string]string{"eth0": "avm7", "eth1": "avm8"}, VsockSocket: "/run/vm7/v.sock"})
		},
		func() error { return c.UpdateDrive(ctx, "config", "/run/vm7/config.img") },
		func() error { return c.UpdateDrive(ctx, "drive1", "/cache/runtime.squashfs") },
		func() error { return c.Resume(ctx) },
	} {
		if err := call(); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{
		`PATCH /vm {"state":"Paused"}`,
		`PUT /snapshot/create {"mem_file_path":"/templates/t/memory","snapshot_path":"/templates/t/state","snapshot_type":"Full"}`,
		`PUT /snapshot/load {"snapshot_path":"/templates/t/state","mem_backend":{"backend_type":"File","backend_path":"/templates/t/memory"},"resume_vm":false,"network_overrides":[{"iface_id":"eth0","host_dev_name":"avm7"},{"iface_id":"eth1","host_dev_name":"avm8"}],"vsock_override":{"uds_path":"/run/vm7/v.sock"}}`,
		`PATCH /drives/config {"drive_id":"config","path_on_host":"/run/vm7/config.img"}`,
		`PATCH /drives/drive1 {"drive_id":"drive1","path_on_host":"/cache/runtime.squashfs"}`,
		`PATCH /vm {"state":"Resumed"}`,
	}
	if !slices.Equal(fake.requests, want) {
		t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(fake.requests, "\n"), strings.Join(want, "\n"))
	}
	// The check refuses what Firecracker would: a load without its
	// memory, an unknown snapshot type, a drive patch without its id.
	for _, bad := range []struct{ method, path, body string }{
		{"PUT", "/snapshot/load", `{"snapshot_path":"s","mem_backend":{"backend_type":"File"}}`},
		{"PUT", "/snapshot/create", `{"snapshot_type":"Incremental","snapshot_path":"s","mem_file_path":"m"}`},
		{"PATCH", "/drives/config", `{"path_on_host":"p"}`},
		{"PUT", "/snapshot/load", `{"snapshot_path":"s","network_overrides":[{"iface_id":"eth0"}]}`},
	} {
		if errs := spec.checkRequest(bad.method, bad.path, []byte(bad.body)); len(errs) == 0 {
			t.Errorf("%s %s %s passed the check", bad.method, bad.path, bad.body)
		}
	}
}

func TestClientAgainstSpec(t *testing.T) {
	spec := loadSpec(t)
	socket := filepath.Join(t.TempDir(), "api.sock")
	fake := newFakeAPI(t, spec, socket)
	c := NewClient(socket)
	defer c.Close()
	ctx := context.Background()

	info, err := c.Describe(ctx)
	if err != nil || info.State != StateRunning || info.VMMVersion != "1.16.1" {
		t.Fatalf("describe: %+v, %v", info, err)
	}
	if err := c.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if info, _ := c.Describe(ctx); info.State != StatePaused {
		t.Errorf("state after pause: %q", info.State)
	}
	if err := c.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.SendCtrlAltDel(ctx); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"GET /",
		`PATCH /vm {"state":"Paused"}`,
		"GET /",
		`PATCH /vm {"state":"Resumed"}`,
		`PUT /actions {"action_type":"SendCtrlAltDel"}`,
	}
	if !slices.Equal(fake.requests, want) {
		t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(fake.requests, "\n"), strings.Join(want, "\n"))
	}

	fake.mu.Lock()
	fake.fail = "The requested operation is not supported in the current state."
	fake.mu.Unlock()
	err = c.Pause(ctx)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Status != 400 || !strings.Contains(apiErr.Fault, "not supported") {
		t.Errorf("error answer: %v", err)
	}
}

func TestClientWithoutServer(t *testing.T) {
	c := NewClient(filepath.Join(t.TempDir(), "missing.sock"))
	if _, err := c.Describe(context.Background()); err == nil || !strings.Contains(err.Error(), "missing.sock") {
		t.Errorf("describe without a server: %v", err)
	}
}

// The spec check of requests must catch what Firecracker would refuse.
func TestRequestCheckCatchesMistakes(t *testing.T) {
	spec := loadSpec(t)
	for _, bad := range []struct{ method, path, body string }{
		{"PUT", "/action", `{"action_type":"SendCtrlAltDel"}`},
		{"POST", "/actions", `{"action_type":"SendCtrlAltDel"}`},
		{"PUT", "/actions", `{"action_type":"Reboot"}`},
		{"PUT", "/actions", `{}`},
		{"PUT", "/actions", ``},
		{"PATCH", "/vm", `{"state":"Stopped"}`},
	} {
		if errs := spec.checkRequest(bad.method, bad.path, []byte(bad.body)); len(errs) == 0 {
			t.Errorf("%s %s %s passed the check", bad.method, bad.path, bad.body)
		}
	}
}
