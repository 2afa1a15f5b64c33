package apiclient

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/alephvm/alephvm/message"
)

const ref = message.ItemHash("7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003")

func node(t *testing.T, h http.HandlerFunc) *Client {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	c, err := New(srv.URL, Token("secret"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestOperations(t *testing.T) {
	var got []string
	c := node(t, func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.Method+" "+r.URL.Path+" "+r.Header.Get("X-Auth-Signature"))
		w.Write([]byte("Done with ref " + string(ref) + "\n"))
	})
	ctx := context.Background()
	for _, op := range []func(context.Context, message.ItemHash) (string, error){c.Start, c.Stop, c.Reboot, c.Erase} {
		if out, err := op(ctx, ref); err != nil || out != "Done with ref "+string(ref) {
			t.Errorf("%q %v", out, err)
		}
	}
	want := []string{"start", "stop", "reboot", "erase"}
	for i, g := range got {
		if g != "POST /control/machine/"+string(ref)+"/"+want[i]+" secret" {
			t.Errorf("request %d: %s", i, g)
		}
	}
}

func TestErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		status int
		body   string
		want   string
	}{
		"json error":   {404, `{"error":"Message x not found"}`, "node answered 404: Message x not found"},
		"text error":   {502, "bad gateway\n", "node answered 502: bad gateway"},
		"huge error":   {500, strings.Repeat("x", 20<<20), "node answered 500: " + strings.Repeat("x", 1000) + "…"},
		"huge success": {200, strings.Repeat("x", 20<<20), "larger than"},
	} {
		t.Run(name, func(t *testing.T) {
			c := node(t, func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tc.status)
				w.Write([]byte(tc.body))
			})
			_, err := c.Stop(context.Background(), ref)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%v", err)
			}
			var e *Error
			if tc.status != 200 && (!errors.As(err, &e) || e.Status != tc.status) {
				t.Errorf("not an *Error of %d: %#v", tc.status, err)
			}
		})
	}
}

func TestRefusesBadInput(t *testing.T) {
	called := false
	c := node(t, func(w http.ResponseWriter, r *http.Request) { called = true })
	for _, bad := range []message.ItemHash{"", "../../about", "x/../../stop", ref + "?a=b"} {
		if _, err := c.Stop(context.Background(), bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
		if err := c.Logs(context.Background(), bad, func(LogLine) error { return nil }); err == nil {
			t.Errorf("logs of %q accepted", bad)
		}
	}
	if called {
		t.Error("a bad ref reached the node")
	}
	for _, base := range []string{"", "localhost:4020", "ftp://x", "http://"} {
		if _, err := New(base, nil); err == nil {
			t.Errorf("base %q accepted", base)
		}
	}
}

func TestAuthIsPluggable(t *testing.T) {
	var header string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { header = r.Header.Get("X-Signed") }))
	defer srv.Close()
	signer := func(req *http.Request, body []byte) error {
		req.Header.Set("X-Signed", req.Method+" "+req.URL.Path)
		return nil
	}
	c, _ := New(srv.URL, signer)
	if _, err := c.Reboot(context.Background(), ref); err != nil || header != "POST /control/machine/"+string(ref)+"/reboot" {
		t.Errorf("%v, header %q", err, header)
	}
	failing, _ := New(srv.URL, func(*http.Request, []byte) error { return errors.New("no wallet") })
	header = "untouched"
	if _, err := failing.Start(context.Background(), ref); err == nil || !strings.Contains(err.Error(), "no wallet") || header != "untouched" {
		t.Errorf("%v, the node was called: %v", err, header != "untouched")
	}
	if err := failing.Logs(context.Background(), ref, func(LogLine) error { return nil }); err == nil || !strings.Contains(err.Error(), "no wallet") {
		t.Errorf("logs: %v", err)
	}
	anonymous, _ := New(srv.URL, nil)
	if _, err := anonymous.Stop(context.Background(), ref); err != nil || header != "" {
		t.Errorf("%v, header %q", err, header)
	}
}

func TestList(t *testing.T) {
	other := message.ItemHash(strings.Repeat("a", 64))
	c := node(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v2/about/executions/list" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(`{"` + string(ref) + `":{"networking":{"ipv4_network":"172.16.4.0/24","ipv4_ip":"172.16.4.2",
			"mapped_ports":{"22":{"host":24000,"tcp":true,"udp":false},"53":{"host":24001,"tcp":true,"udp":true}}},
			"status":{"started_at":"2026-01-02 03:04:05.250000+00:00"},"running":true,"vm_type":"instance","vcpus":2,"memory":2048},
			"` + string(other) + `":{"networking":{},"running":false,"vm_type":"microvm","vcpus":1,"memory":256}}`))
	})
	list, err := c.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Ref != ref || list[1].Ref != other {
		t.Fatalf("%+v", list)
	}
	e := list[0]
	if !e.Running || e.VMType != "instance" || e.VCPUs != 2 || e.MemoryMiB != 2048 || e.IPv4 != "172.16.4.2" ||
		e.MappedPorts[22] != (MappedPort{Host: 24000, TCP: true}) || e.MappedPorts[53] != (MappedPort{Host: 24001, TCP: true, UDP: true}) ||
		!e.StartedAt.Equal(time.Date(2026, 1, 2, 3, 4, 5, 250e6, time.UTC)) {
		t.Errorf("%+v", e)
	}
	if list[1].Running || list[1].MappedPorts != nil || !list[1].StartedAt.IsZero() {
		t.Errorf("%+v", list[1])
	}
}

func TestListRefusesHostileAnswers(t *testing.T) {
	for name, body := range map[string]string{
		"not json":       "<html>",
		"a list":         "[]",
		"port not num":   `{"` + string(ref) + `":{"networking":{"mapped_ports":{"ssh":{"host":1}}}}}`,
		"port too large": `{"` + string(ref) + `":{"networking":{"mapped_ports":{"70000":{"host":1}}}}}`,
		"bad start":      `{"` + string(ref) + `":{"running":true,"status":{"started_at":"yesterday"}}}`,
	} {
		c := node(t, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(body)) })
		if _, err := c.List(context.Background()); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestLogs(t *testing.T) {
	var auth string
	c := node(t, func(w http.ResponseWriter, r *http.Request) {
		auth = r.Header.Get("X-Auth-Signature")
		if r.URL.Path != "/control/machine/"+string(ref)+"/logs" {
			http.Error(w, `{"error":"no such VM"}`, http.StatusNotFound)
			return
		}
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		for _, m := range []map[string]string{{"type": "stdout", "message": "hello"}, {"type": "system", "message": "VM stopped"}} {
			wsjson.Write(r.Context(), conn, m)
		}
		conn.Close(websocket.StatusNormalClosure, "")
	})
	var lines []LogLine
	err := c.Logs(context.Background(), ref, func(l LogLine) error { lines = append(lines, l); return nil })
	if err != nil || len(lines) != 2 || lines[0] != (LogLine{"stdout", "hello"}) || lines[1].Stream != "system" {
		t.Errorf("%v %+v", err, lines)
	}
	if auth != "secret" {
		t.Errorf("the logs request carried %q, not the credentials", auth)
	}
	stop := errors.New("enough")
	if err := c.Logs(context.Background(), ref, func(LogLine) error { return stop }); !errors.Is(err, stop) {
		t.Errorf("fn's error: %v", err)
	}
	err = c.Logs(context.Background(), message.ItemHash(strings.Repeat("b", 64)), func(LogLine) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "404") || !strings.Contains(err.Error(), "no such VM") {
		t.Errorf("unknown VM: %v", err)
	}
}

func TestUsageAndRates(t *testing.T) {
	other := strings.Repeat("a", 64)
	var cpu, disk float64 = 10, 1000
	c := node(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintf(w, `# TYPE alephvm_vm_up gauge
alephvm_vm_up{hypervisor="qemu",item_hash="%[1]s",type="instance"} 1
alephvm_vm_up{hypervisor="qemu",item_hash="%[2]s",type="program"} 1
# TYPE alephvm_vm_cpu_seconds_total counter
alephvm_vm_cpu_seconds_total{hypervisor="qemu",item_hash="%[1]s",type="instance"} %[3]g
alephvm_vm_cpu_seconds_total{hypervisor="qemu",item_hash="%[2]s",type="program"} 1
# TYPE alephvm_vm_uptime_seconds gauge
alephvm_vm_uptime_seconds{hypervisor="qemu",item_hash="%[1]s",type="instance"} 3600.5
# TYPE alephvm_vm_memory_used_bytes gauge
alephvm_vm_memory_used_bytes{hypervisor="qemu",item_hash="%[1]s",type="instance"} 1.048576e+08
# TYPE alephvm_vm_disk_read_bytes_total counter
alephvm_vm_disk_read_bytes_total{hypervisor="qemu",item_hash="%[1]s",type="instance"} %[4]g
# TYPE alephvm_vms gauge
alephvm_vms{state="running",type="instance"} 1
`, string(ref), other, cpu, disk)
	})
	ctx := context.Background()
	before, err := c.Usage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(before.VMs) != 2 || before.VMs[0].Ref != string(ref) || before.VMs[0].Type != "instance" || !before.VMs[0].Up ||
		before.VMs[0].Uptime != 3600500*time.Millisecond || before.VMs[0].MemoryUsed != 100<<20 || before.VMs[0].CPUSeconds != 10 {
		t.Fatalf("%+v", before.VMs)
	}
	cpu, disk = 11, 3000 // one CPU second and 2000 bytes in 2 s
	after, _ := c.Usage(ctx)
	after.At = before.At.Add(2 * time.Second)
	rates := after.RatesSince(before)
	if len(rates) != 2 || rates[0].Ref != string(ref) || rates[0].CPUPercent != 50 || rates[0].DiskReadPerSec != 1000 || rates[1].CPUPercent != 0 {
		t.Errorf("rates: %+v", rates)
	}
	bad := node(t, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("alephvm_vm_up{item_hash=\"x\" 1\n")) })
	if _, err := bad.Usage(ctx); err == nil {
		t.Error("a broken exposition was read")
	}
}
