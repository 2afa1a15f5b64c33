package api

import (
	"context"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/hostinfo"
)

type fakeNodeInfo struct{}

func (fakeNodeInfo) Host() (hostinfo.Host, error) {
	return hostinfo.Host{CPUs: 8, Load: [3]float64{0.52, 1, 0.25}, FreqMinMHz: 1500, FreqMaxMHz: 3100.5,
		MemTotal: 16_777_216_000, MemAvailable: 8_388_607_999, Arch: "x86_64", Vendor: "AuthenticAMD",
		Model: "AMD EPYC 7763 64-Core Processor", FrequencyHz: 3_100_500_000, Features: []string{"sev", "sev_es"}}, nil
}

func (fakeNodeInfo) Disk() (hostinfo.Disk, error) {
	return hostinfo.Disk{Total: 500_107_862_016, Available: 123_456_789_012}, nil
}

func (fakeNodeInfo) PublicConfig() PublicConfig {
	return PublicConfig{DomainName: "crn.example.org", APIServer: "https://official.aleph.cloud",
		CheckFastAPIVMID: strings.Repeat("d2", 32), UseJailer: true, IPv6AddressPool: "fc00:1:2:3::/64",
		IPv6Forwarding: true, InstanceDefaultHypervisor: "qemu", QEMU: true}
}

type fakeHostCheck struct{ ok bool }

func (f fakeHostCheck) CheckHost(context.Context) ([]byte, bool) {
	if f.ok {
		return []byte(`{"ipv4": {"egress": true, "dns": true, "domain": true, "http": true}, "ipv6": {"egress": true, "dns": true, "domain": true, "http": false}}`), true
	}
	return []byte(`{"ipv4": {"egress": false, "dns": false, "domain": false, "http": false}, "ipv6": {"egress": false, "dns": false, "domain": false, "http": false}}`), false
}

func (f fakeHostCheck) CheckIPv6(context.Context) []byte {
	return []byte(`{"host": true, "vm": false}`)
}

// TestStatusContracts checks each status route's answer, byte for byte,
// against golden files written from the reference's shapes
// (orchestrator/resources.py's MachineUsage and MachineCapability,
// views/__init__.py's status_public_config).
func TestStatusContracts(t *testing.T) {
	at := time.Date(2026, 12, 3, 6, 37, 42, 0, time.UTC)
	srv := httptest.NewServer(New(Options{NodeInfo: fakeNodeInfo{}, HostCheck: fakeHostCheck{ok: true}, Version: "1.2.0",
		Now: func() time.Time { return at }}))
	defer srv.Close()
	for _, tc := range []struct{ path, golden string }{
		{"/about/usage/system", "usage_system.json"},
		{"/about/capability", "capability.json"},
		{"/status/config", "status_config.json"},
		{"/status/check/host", "check_host.json"},
		{"/status/check/ipv6", "check_ipv6.json"},
	} {
		resp, err := http.Get(srv.URL + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json; charset=utf-8" || resp.Header.Get("Server") != "aleph-vm/1.2.0" {
			t.Errorf("%s: %d %v", tc.path, resp.StatusCode, resp.Header)
		}
		golden := filepath.Join("testdata", "status", tc.golden)
		if os.Getenv("UPDATE_GOLDEN") != "" {
			os.MkdirAll(filepath.Dir(golden), 0o755)
			os.WriteFile(golden, append(body, '\n'), 0o644)
		}
		want, err := os.ReadFile(golden)
		if err != nil {
			t.Fatal(err)
		}
		if string(body)+"\n" != string(want) {
			t.Errorf("%s:\n got %s\nwant %s", tc.path, body, want)
		}
	}
}

func TestStatusFailures(t *testing.T) {
	bare := httptest.NewServer(New(Options{Version: "dev"}))
	defer bare.Close()
	failing := httptest.NewServer(New(Options{HostCheck: fakeHostCheck{}, Version: "1.2.0"}))
	defer failing.Close()
	for _, tc := range []struct {
		url    string
		status int
		body   string
	}{
		{bare.URL + "/about/usage/system", 503, ""},
		{bare.URL + "/about/capability", 503, ""},
		{bare.URL + "/status/config", 503, ""},
		{bare.URL + "/status/check/host", 503, ""},
		{failing.URL + "/status/check/host", 503, `"egress": false`},
		{failing.URL + "/status/check/version?reference=1.1.9", 200, "Up-to-date: version 1.2.0 >= 1.1.9"},
		{failing.URL + "/status/check/version?reference=v1.2", 200, "Up-to-date"},
		{failing.URL + "/status/check/version?reference=1.10.0", 403, "Outdated: version 1.2.0 < 1.10.0"},
		{failing.URL + "/status/check/version", 400, "must be specified"},
		{failing.URL + "/status/check/version?reference=one", 400, "Invalid version"},
		{bare.URL + "/status/check/version?reference=1.0", 503, "Invalid version: 'dev'"},
	} {
		resp, err := http.Get(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || !strings.Contains(string(body), tc.body) {
			t.Errorf("%s: %d %s, want %d %q", tc.url, resp.StatusCode, body, tc.status, tc.body)
		}
	}
}

func TestCORS(t *testing.T) {
	srv := httptest.NewServer(New(Options{NodeInfo: fakeNodeInfo{}, Version: "1.2.0"}))
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+"/about/usage/system", nil)
	req.Header.Set("Origin", "https://explorer.example")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get("Access-Control-Allow-Origin") != "https://explorer.example" || resp.Header.Get("Access-Control-Allow-Credentials") != "true" {
		t.Errorf("GET with an origin: %v", resp.Header)
	}
	req, _ = http.NewRequest("OPTIONS", srv.URL+"/status/config", nil)
	req.Header.Set("Origin", "https://explorer.example")
	req.Header.Set("Access-Control-Request-Method", "GET")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Methods") != "GET" {
		t.Errorf("preflight: %d %v", resp.StatusCode, resp.Header)
	}
	resp, err = http.Get(srv.URL + "/status/config")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("CORS headers without an origin: %v", resp.Header)
	}
}

func TestPythonJSON(t *testing.T) {
	got, err := pythonJSON(map[string]any{"a": []any{1, "x,y: é", pyFloat(60)}, "b": nil})
	if want := `{"a": [1, "x,y: \u00e9", 60.0], "b": null}`; err != nil || string(got) != want {
		t.Errorf("got %s %v, want %s", got, err, want)
	}
}

type fakeRecords []ExecutionRecord

func (f fakeRecords) ExecutionRecords(context.Context) ([]ExecutionRecord, error) { return f, nil }

func TestExecutionRecords(t *testing.T) {
	id := 4
	at := time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC)
	srv := httptest.NewServer(New(Options{Records: fakeRecords{{UUID: "u", VMHash: "ab", VMID: &id, TimeDefined: *RecordTime(at),
		TimeStarted: RecordTime(at), VCPUs: 1, Memory: 256, Message: []byte(`{"a":1}`), OriginalMessage: []byte(`{"a":1}`), GPUs: []any{},
		MappedPorts: map[string]MappedPort{}}}}))
	defer srv.Close()
	_, body := get(t, srv.URL+"/about/executions/records", "")
	want := `[{"uuid":"u","vm_hash":"ab","vm_id":4,"time_defined":"2026-12-03 06:00:00.000000+00:00","time_prepared":null,"time_started":"2026-12-03 06:00:00.000000+00:00","time_stopping":null,"cpu_time_user":null,"cpu_time_system":null,"io_read_count":null,"io_write_count":null,"io_read_bytes":null,"io_write_bytes":null,"vcpus":1,"memory":256,"network_tap":null,"message":{"a":1},"original_message":{"a":1},"persistent":false,"gpus":[],"mapped_ports":{}}]`
	if strings.TrimSpace(body) != want {
		t.Errorf("got  %s\nwant %s", body, want)
	}
	bare := httptest.NewServer(New(Options{}))
	defer bare.Close()
	if _, body := get(t, bare.URL+"/about/executions/records", ""); strings.TrimSpace(body) != "[]" {
		t.Errorf("no records: %s", body)
	}
}

func TestLogin(t *testing.T) {
	srv := httptest.NewServer(New(Options{LoginToken: "s3cret", Settings: func() map[string]string { return map[string]string{"ALEPH_VM_X": "1"} }}))
	defer srv.Close()
	jar, _ := cookiejar.New(nil)
	c := &http.Client{Jar: jar}
	for _, path := range []string{"/about/config", "/about/executions/details", "/about/login?token=wrong"} {
		resp, err := c.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("%s before login: %d", path, resp.StatusCode)
		}
	}
	resp, err := c.Get(srv.URL + "/about/login?token=s3cret")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || strings.TrimSpace(string(body)) != `{"ALEPH_VM_X":"1"}` {
		t.Errorf("login then config: %d %s", resp.StatusCode, body)
	}
	resp, _ = c.Get(srv.URL + "/about/executions/details")
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || strings.TrimSpace(string(body)) != "[]" {
		t.Errorf("details: %d %s", resp.StatusCode, body)
	}
	closed := httptest.NewServer(New(Options{}))
	defer closed.Close()
	if resp, _ := http.Get(closed.URL + "/about/login?token="); resp.StatusCode != 401 {
		t.Errorf("a node without a token: %d", resp.StatusCode)
	}
}
