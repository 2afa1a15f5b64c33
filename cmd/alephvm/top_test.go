package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeNode serves the metrics of two running VMs, whose counters grow at
// each scrape (the busy one by a CPU second), and the executions list.
func fakeNode(t *testing.T) *httptest.Server {
	busy, idle := strings.Repeat("b", 64), strings.Repeat("1", 64)
	var scrapes atomic.Int64
	started := time.Now().Add(-(26*time.Hour + 5*time.Minute)).UTC().Format("2006-01-02 15:04:05.000000+00:00")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/metrics":
			n := float64(scrapes.Add(1))
			for _, v := range []struct {
				ref, typ string
				cpu      float64
			}{{busy, "instance", 10 * n}, {idle, "program", 1}} {
				l := fmt.Sprintf(`{hypervisor="qemu",item_hash="%s",type="%s"}`, v.ref, v.typ)
				fmt.Fprintf(w, "alephvm_vm_up%s 1\nalephvm_vm_cpu_seconds_total%s %g\nalephvm_vm_memory_used_bytes%s 104857600\n", l, l, v.cpu, l)
				fmt.Fprintf(w, "alephvm_vm_memory_assigned_bytes%s 2147483648\nalephvm_vm_uptime_seconds%s 3725\n", l, l)
				fmt.Fprintf(w, "alephvm_vm_disk_written_bytes_total%s %g\nalephvm_vm_network_receive_bytes_total%s %g\n", l, n*1e6, l, n*2048)
			}
		case "/v2/about/executions/list":
			fmt.Fprintf(w, `{"%s":{"networking":{"ipv4_ip":"172.16.0.2","mapped_ports":{"22":{"host":24000,"tcp":true,"udp":false},"53":{"host":24001,"tcp":true,"udp":true}}},
				"status":{"started_at":%q},"running":true,"vm_type":"instance","vcpus":2,"memory":2048},
				"%s":{"networking":{},"status":{"started_at":null},"running":false,"vm_type":"instance","vcpus":1,"memory":512}}`, busy, started, idle)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestTop(t *testing.T) {
	srv := fakeNode(t)
	code, out, errOut := runCLI(t, nil, "top", "--node", srv.URL, "--interval", "200ms", "-n", "2")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if n := strings.Count(out, "alephvm top  "+srv.URL); n != 2 {
		t.Fatalf("%d screens:\n%s", n, out)
	}
	screens := strings.Split(out, "\n\n")
	last := screens[len(screens)-1]
	lines := strings.Split(strings.TrimSpace(last), "\n")
	// Busiest first: ten CPU seconds in 0.2 s is about 5000%.
	if len(lines) != 3 || !strings.HasPrefix(strings.TrimSpace(lines[1]), "bbbbbbbbbbbb") || !strings.Contains(lines[1], "instance") ||
		!strings.Contains(lines[1], "100.0 MiB") || !strings.Contains(lines[1], "2.0 GiB") || !strings.Contains(lines[1], "1h02m") ||
		!strings.HasPrefix(strings.TrimSpace(lines[2]), "111111111111") || !strings.Contains(lines[2], " 0.0 ") {
		t.Errorf("screen:\n%s", last)
	}
	if !regexp.MustCompile(`bbbbbbbbbbbb\s+instance\s+\d{4}\.\d\s`).MatchString(lines[1]) {
		t.Errorf("CPU of the busy VM:\n%s", last)
	}
	if !strings.Contains(lines[1], "MiB") || !strings.Contains(lines[1], "KiB") {
		t.Errorf("disk and network rates:\n%s", last)
	}
	for _, args := range [][]string{{"--interval", "1ms"}, {"-n", "-1"}} {
		if code, _, _ := runCLI(t, nil, append([]string{"top", "--node", srv.URL}, args...)...); code == 0 {
			t.Errorf("%v accepted", args)
		}
	}
	if code, _, errOut := runCLI(t, nil, "top", "--node", "http://127.0.0.1:1", "-n", "1"); code == 0 || !strings.Contains(errOut, "is alephvm serve running?") {
		t.Errorf("no node: %d %s", code, errOut)
	}
}

func TestVMListUptimeAndPorts(t *testing.T) {
	srv := fakeNode(t)
	code, out, errOut := runCLI(t, nil, "vm", "list", "--node", srv.URL)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !regexp.MustCompile(`^HASH\s+TYPE\s+STATE\s+VCPUS\s+MEMORY\s+IPV4\s+UPTIME\s+PORTS$`).MatchString(lines[0]) {
		t.Fatalf("list:\n%s", out)
	}
	if !regexp.MustCompile(`^1{64}\s+instance\s+stopped\s+1\s+512MiB\s+-\s+-$`).MatchString(lines[1]) ||
		!regexp.MustCompile(`^b{64}\s+instance\s+running\s+2\s+2048MiB\s+172\.16\.0\.2\s+1d2h\s+24000->22/tcp,24001->53/tcp,24001->53/udp$`).MatchString(lines[2]) {
		t.Errorf("list:\n%s", out)
	}
}
