package metrics

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor/qemu"
)

// qmpServer answers query-blockstats on a unix socket, for every
// connection, as QEMU does for a VM with a root disk, a seed and a volume.
func qmpServer(b testing.TB) string {
	sock := filepath.Join(b.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	stats := map[string]any{"rd_bytes": 123456789, "wr_bytes": 98765432, "rd_operations": 12345, "wr_operations": 6789,
		"flush_operations": 12, "rd_total_time_ns": 1e9, "wr_total_time_ns": 2e9, "invalid_rd_operations": 0,
		"idle_time_ns": 5e8, "account_invalid": true, "account_failed": true}
	var devices []any
	for i := range 3 {
		devices = append(devices, map[string]any{"device": "", "qdev": fmt.Sprintf("/machine/peripheral/drive%d/virtio-backend", i),
			"node-name": fmt.Sprintf("drive%d", i), "stats": stats, "parent": map[string]any{"node-name": "file", "stats": stats}})
	}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				enc := json.NewEncoder(conn)
				enc.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{}, "capabilities": []string{}}})
				sc := bufio.NewScanner(conn)
				for sc.Scan() {
					var req struct {
						Execute string `json:"execute"`
						ID      any    `json:"id"`
					}
					json.Unmarshal(sc.Bytes(), &req)
					var ret any = map[string]any{}
					if req.Execute == "query-blockstats" {
						ret = devices
					}
					enc.Encode(map[string]any{"return": ret, "id": req.ID})
				}
			}()
		}
	}()
	return sock
}

// benchNode is a node of n VMs, half QEMU (disk counters over QMP, from a
// fake monitor) and half read from /proc/<pid>/io; each VM's process is
// this one (the kernel's own /proc files, linked), each has a tap in a
// /proc/net/dev of n+1 interfaces.
func benchNode(b *testing.B, n int) *Metrics {
	proc := b.TempDir()
	os.MkdirAll(filepath.Join(proc, "net"), 0o755)
	dev, _ := os.Create(filepath.Join(proc, "net", "dev"))
	fmt.Fprint(dev, "Inter-|   Receive\n face |bytes\n    lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n")
	sock := qmpServer(b)
	var vms []VM
	for i := range n {
		pid := 100000 + i
		os.Symlink(fmt.Sprintf("/proc/%d", os.Getpid()), filepath.Join(proc, strconv.Itoa(pid)))
		tap := fmt.Sprintf("avm%d", i)
		fmt.Fprintf(dev, "%7s: %d %d 0 0 0 0 0 0 %d %d 0 0 0 0 0 0\n", tap, 1000*i, i, 2000*i, 2*i)
		vm := VM{Ref: fmt.Sprintf("%064x", i), Type: execution.TypeInstance, Hypervisor: "qemu", State: StateRunning,
			VCPUs: 2, MemoryMiB: 2048, StartedAt: time.Now().Add(-time.Hour), Pid: pid, Tap: tap}
		if i%2 == 0 {
			q, err := qemu.DialQMP(context.Background(), sock)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { q.Close() })
			vm.Disk = func(ctx context.Context) (DiskIO, error) {
				s, err := q.BlockStats(ctx)
				return DiskIO(s), err
			}
		} else {
			vm.Type, vm.Hypervisor = execution.TypeProgram, "firecracker"
		}
		vms = append(vms, vm)
	}
	dev.Close()
	m := New(Options{Source: &fakeSource{vms: vms, node: Node{MemoryCapacityMiB: 1 << 20, VCPUsCapacity: 256}}, Proc: proc})
	for range 10 {
		m.ColdStart(execution.ColdStart{Type: execution.TypeProgram, Total: time.Second,
			Phases: []execution.Phase{{Name: "network", Took: time.Millisecond}, {Name: "ready", Took: time.Second}}})
	}
	return m
}

func scrapeOnce(b *testing.B, m *Metrics) int {
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		b.Fatalf("scrape: %d", rec.Code)
	}
	return rec.Body.Len()
}

// BenchmarkScrape100VMs measures one scrape of a node running 100 VMs,
// and reports it against a scrape of the same node without VMs (the
// node's own counters, the Go runtime's and its process's) measured in
// the same run.
func BenchmarkScrape100VMs(b *testing.B) {
	empty := benchNode(b, 0)
	const baseRuns = 50
	start := time.Now()
	for range baseRuns {
		scrapeOnce(b, empty)
	}
	base := time.Since(start) / baseRuns
	m := benchNode(b, 100)
	size := scrapeOnce(b, m)
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		scrapeOnce(b, m)
	}
	b.StopTimer()
	per := b.Elapsed() / time.Duration(b.N)
	// The fake monitors answer in this process: their CPU is counted too.
	cpu := (cpuTime() - cpu0) / time.Duration(b.N)
	b.ReportMetric(float64(size), "bytes/scrape")
	b.ReportMetric(float64(cpu.Microseconds())/1000, "cpu-ms/scrape")
	b.ReportMetric(per.Seconds()/base.Seconds(), "x-no-VM-scrape")
	b.Logf("one scrape of 100 VMs: %v wall, %v CPU (fake monitors included), %d bytes; of no VM: %v; ratio %.1f",
		per.Round(time.Microsecond), cpu.Round(time.Microsecond), size, base.Round(time.Microsecond), per.Seconds()/base.Seconds())
}

// cpuTime is the CPU time this process used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
