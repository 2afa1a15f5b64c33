package metrics

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/alephvm/alephvm/execution"
)

// fakeSource is a node with the VMs and capacity a test gives.
type fakeSource struct {
	mu     sync.Mutex
	vms    []VM
	node   Node
	vmsErr error
}

func (f *fakeSource) VMs(context.Context) ([]VM, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.vms, f.vmsErr
}

func (f *fakeSource) Node(context.Context) (Node, error) { return f.node, nil }

// fakeProc writes a proc tree: a process per pid with the given CPU ticks
// (user, system), resident pages and I/O, and /proc/net/dev with taps.
func fakeProc(t testing.TB, procs map[int][3]uint64, taps map[string]netCounters) string {
	t.Helper()
	dir := t.TempDir()
	for pid, p := range procs {
		d := filepath.Join(dir, fmt.Sprint(pid))
		os.MkdirAll(d, 0o755)
		// A command name with a space and a parenthesis, as QEMU's
		// -name can make it.
		stat := fmt.Sprintf("%d (qemu (vm) x) S 1 %d %d 0 -1 4194560 100 0 0 0 %d %d 0 0 20 0 3 0 100 1000000 500 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n",
			pid, pid, pid, p[0], p[1])
		os.WriteFile(filepath.Join(d, "stat"), []byte(stat), 0o644)
		os.WriteFile(filepath.Join(d, "statm"), []byte(fmt.Sprintf("250000 %d 1000 800 0 20000 0\n", p[2])), 0o644)
		io := fmt.Sprintf("rchar: 9\nwchar: 9\nsyscr: %d\nsyscw: %d\nread_bytes: %d\nwrite_bytes: %d\ncancelled_write_bytes: 0\n", p[0], p[1], p[0]*512, p[1]*512)
		os.WriteFile(filepath.Join(d, "io"), []byte(io), 0o644)
	}
	os.MkdirAll(filepath.Join(dir, "net"), 0o755)
	var sb strings.Builder
	sb.WriteString("Inter-|   Receive                                                |  Transmit\n")
	sb.WriteString(" face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n")
	sb.WriteString("    lo:  123456     789    0    0    0     0          0         0   123456     789    0    0    0     0       0          0\n")
	for name, c := range taps {
		fmt.Fprintf(&sb, "%6s: %d %d 0 0 0 0 0 0 %d %d 0 0 0 0 0 0\n", name, c.rxBytes, c.rxPackets, c.txBytes, c.txPackets)
	}
	os.WriteFile(filepath.Join(dir, "net", "dev"), []byte(sb.String()), 0o644)
	return dir
}

// scrape reads /metrics and parses it with Prometheus's text parser.
func scrape(t testing.TB, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("scrape: %d %s", rec.Code, rec.Body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	return fams
}

// value returns the value of the series of family name whose labels
// include want, and whether there is one.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		for k, v := range want {
			found := false
			for _, l := range m.Label {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

var perVM = []string{
	"alephvm_vm_up", "alephvm_vm_uptime_seconds", "alephvm_vm_cpu_seconds_total", "alephvm_vm_memory_used_bytes",
	"alephvm_vm_memory_assigned_bytes", "alephvm_vm_vcpus", "alephvm_vm_disk_read_bytes_total", "alephvm_vm_disk_written_bytes_total",
	"alephvm_vm_disk_reads_completed_total", "alephvm_vm_disk_writes_completed_total", "alephvm_vm_network_receive_bytes_total",
	"alephvm_vm_network_transmit_bytes_total", "alephvm_vm_network_receive_packets_total", "alephvm_vm_network_transmit_packets_total",
}

func TestCollectorReadsEachVM(t *testing.T) {
	proc := fakeProc(t, map[int][3]uint64{101: {250, 50, 1000}, 102: {100, 0, 2000}},
		map[string]netCounters{"avm1": {rxBytes: 1000, rxPackets: 10, txBytes: 5000, txPackets: 20}, "avm2": {rxBytes: 7, rxPackets: 1, txBytes: 9, txPackets: 2}})
	src := &fakeSource{
		vms: []VM{
			{Ref: "aa", Type: execution.TypeInstance, Hypervisor: "qemu", State: StateRunning, VCPUs: 2, MemoryMiB: 2048,
				StartedAt: time.Now().Add(-time.Hour), Pid: 101, Tap: "avm1",
				Disk: func(context.Context) (DiskIO, error) {
					return DiskIO{ReadBytes: 4096, WriteBytes: 8192, ReadOps: 1, WriteOps: 2}, nil
				}},
			{Ref: "bb", Type: execution.TypeProgram, Hypervisor: "firecracker", State: StateRunning, VCPUs: 1, MemoryMiB: 128,
				StartedAt: time.Now().Add(-time.Minute), Pid: 102, Tap: "avm2"},
			{Ref: "cc", Type: execution.TypeInstance, Hypervisor: "qemu", State: StateStopped, VCPUs: 1, MemoryMiB: 512},
			{Ref: "dd", Type: execution.TypeProgram, Hypervisor: "qemu", State: StateBooting, VCPUs: 1, MemoryMiB: 256},
		},
		node: Node{MemoryCapacityMiB: 8192, MemoryUsedMiB: 2432, VCPUsCapacity: 8, VCPUsUsed: 4, DiskCapacity: 100 << 30, DiskFree: 40 << 30, StoreSize: 123456},
	}
	m := New(Options{Source: src, Proc: proc, Version: "1.2.3"})
	fams := scrape(t, m)

	for _, ref := range []string{"aa", "bb"} {
		for _, name := range perVM {
			if _, ok := value(fams, name, map[string]string{"item_hash": ref}); !ok {
				t.Errorf("%s: no %s", ref, name)
			}
		}
	}
	tests := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"alephvm_vm_up", map[string]string{"item_hash": "aa", "type": "instance", "hypervisor": "qemu"}, 1},
		{"alephvm_vm_cpu_seconds_total", map[string]string{"item_hash": "aa"}, 3},
		{"alephvm_vm_memory_used_bytes", map[string]string{"item_hash": "aa"}, float64(1000 * pageSize)},
		{"alephvm_vm_memory_assigned_bytes", map[string]string{"item_hash": "aa"}, 2048 << 20},
		{"alephvm_vm_vcpus", map[string]string{"item_hash": "aa"}, 2},
		{"alephvm_vm_disk_read_bytes_total", map[string]string{"item_hash": "aa"}, 4096},
		{"alephvm_vm_disk_written_bytes_total", map[string]string{"item_hash": "aa"}, 8192},
		{"alephvm_vm_disk_reads_completed_total", map[string]string{"item_hash": "aa"}, 1},
		{"alephvm_vm_disk_writes_completed_total", map[string]string{"item_hash": "aa"}, 2},
		// The tap's transmit is what the guest received.
		{"alephvm_vm_network_receive_bytes_total", map[string]string{"item_hash": "aa"}, 5000},
		{"alephvm_vm_network_transmit_bytes_total", map[string]string{"item_hash": "aa"}, 1000},
		{"alephvm_vm_network_receive_packets_total", map[string]string{"item_hash": "aa"}, 20},
		{"alephvm_vm_network_transmit_packets_total", map[string]string{"item_hash": "aa"}, 10},
		// Without a monitor's counters: the process's I/O.
		{"alephvm_vm_disk_read_bytes_total", map[string]string{"item_hash": "bb", "hypervisor": "firecracker", "type": "program"}, 100 * 512},
		{"alephvm_vm_disk_reads_completed_total", map[string]string{"item_hash": "bb"}, 100},
		{"alephvm_vm_cpu_seconds_total", map[string]string{"item_hash": "bb"}, 1},
		// Stopped and booting VMs: known, down.
		{"alephvm_vm_up", map[string]string{"item_hash": "cc"}, 0},
		{"alephvm_vm_memory_assigned_bytes", map[string]string{"item_hash": "cc"}, 512 << 20},
		{"alephvm_vm_up", map[string]string{"item_hash": "dd"}, 0},
		{"alephvm_vms", map[string]string{"type": "instance", "state": "running"}, 1},
		{"alephvm_vms", map[string]string{"type": "instance", "state": "stopped"}, 1},
		{"alephvm_vms", map[string]string{"type": "program", "state": "booting"}, 1},
		{"alephvm_vms", map[string]string{"type": "persistent_program", "state": "running"}, 0},
		{"alephvm_node_memory_capacity_bytes", nil, 8192 << 20},
		{"alephvm_node_memory_used_bytes", nil, 2432 << 20},
		{"alephvm_node_memory_free_bytes", nil, (8192 - 2432) << 20},
		{"alephvm_node_vcpus_capacity", nil, 8},
		{"alephvm_node_vcpus_used", nil, 4},
		{"alephvm_node_vcpus_free", nil, 4},
		{"alephvm_node_disk_capacity_bytes", nil, 100 << 30},
		{"alephvm_node_disk_used_bytes", nil, 60 << 30},
		{"alephvm_node_disk_free_bytes", nil, 40 << 30},
		{"alephvm_store_size_bytes", nil, 123456},
		{"alephvm_build_info", map[string]string{"version": "1.2.3"}, 1},
		{"alephvm_scrape_errors_total", map[string]string{"source": "disk"}, 0},
	}
	for _, tt := range tests {
		if got, ok := value(fams, tt.name, tt.labels); !ok || got != tt.want {
			t.Errorf("%s%v = %v (found %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
	if up, _ := value(fams, "alephvm_vm_uptime_seconds", map[string]string{"item_hash": "aa"}); up < 3600 || up > 3700 {
		t.Errorf("uptime of aa: %v", up)
	}
	for _, name := range []string{"alephvm_vm_cpu_seconds_total", "alephvm_vm_uptime_seconds", "alephvm_vm_disk_read_bytes_total"} {
		if _, ok := value(fams, name, map[string]string{"item_hash": "cc"}); ok {
			t.Errorf("a stopped VM has %s", name)
		}
	}
	for name, f := range fams {
		if !strings.HasPrefix(name, "alephvm_") && !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") {
			t.Errorf("family %s: not alephvm_", name)
		}
		if f.GetType() == dto.MetricType_COUNTER && !strings.HasSuffix(name, "_total") {
			t.Errorf("counter %s: no _total", name)
		}
	}
}

func TestCollectorCountsWhatFails(t *testing.T) {
	proc := fakeProc(t, map[int][3]uint64{101: {1, 1, 1}}, nil)
	src := &fakeSource{vms: []VM{
		{Ref: "aa", Type: execution.TypeInstance, Hypervisor: "qemu", State: StateRunning, Pid: 101, StartedAt: time.Now(),
			Disk: func(context.Context) (DiskIO, error) { return DiskIO{}, errors.New("monitor gone") }},
		// Listed running, its process gone since: a VM that just stopped,
		// not a failed read.
		{Ref: "bb", Type: execution.TypeProgram, Hypervisor: "qemu", State: StateRunning, Pid: 999, StartedAt: time.Now()},
	}}
	m := New(Options{Source: src, Proc: proc})
	fams := scrape(t, m)
	if n, _ := value(fams, "alephvm_scrape_errors_total", map[string]string{"source": "disk"}); n != 1 {
		t.Errorf("disk errors: %v", n)
	}
	if n, _ := value(fams, "alephvm_scrape_errors_total", map[string]string{"source": "process"}); n != 0 {
		t.Errorf("process errors: %v", n)
	}
	if up, _ := value(fams, "alephvm_vm_up", map[string]string{"item_hash": "aa"}); up != 1 {
		t.Errorf("aa: up %v", up)
	}
	if _, ok := value(fams, "alephvm_vm_disk_read_bytes_total", map[string]string{"item_hash": "aa"}); ok {
		t.Error("aa has disk counters it could not read")
	}
	if up, _ := value(fams, "alephvm_vm_up", map[string]string{"item_hash": "bb"}); up != 0 {
		t.Errorf("bb: up %v", up)
	}
	// Neither /proc/net/dev nor the VM list: counted, the rest served.
	src.mu.Lock()
	src.vms[1].Tap, src.vmsErr = "avm9", errors.New("database locked")
	src.mu.Unlock()
	os.Remove(filepath.Join(proc, "net", "dev"))
	fams = scrape(t, m)
	for source, want := range map[string]float64{"disk": 2, "vms": 1, "network": 1} {
		if n, _ := value(fams, "alephvm_scrape_errors_total", map[string]string{"source": source}); n != want {
			t.Errorf("%s errors: %v, want %v", source, n, want)
		}
	}
	if _, ok := value(fams, "alephvm_node_memory_capacity_bytes", nil); !ok {
		t.Error("node metrics missing after a failed read")
	}
}

func TestEventCounters(t *testing.T) {
	m := New(Options{})
	ok := execution.ColdStart{Ref: "aa", Type: execution.TypeProgram, At: time.Now(), Total: 3 * time.Second,
		Phases: []execution.Phase{{Name: "network", Took: time.Millisecond}, {Name: "ready", Took: 2 * time.Second}}}
	m.ColdStart(ok)
	m.ColdStart(execution.ColdStart{Ref: "bb", Type: execution.TypeInstance, Err: errors.New("no disk"),
		Phases: []execution.Phase{{Name: "fetch", Took: time.Second}}})
	m.ProgramRequest(200, 10*time.Millisecond)
	m.ProgramRequest(200, 20*time.Millisecond)
	m.ProgramRequest(503, time.Millisecond)
	m.AllocationCall("allocations", 200)
	m.AllocationCall("allocation_notify", 401)
	m.DownloadStarted()
	m.DownloadReceived(1000)
	m.DownloadReceived(24)
	m.DownloadStarted()
	m.DownloadEnded(errors.New("gateway down"))
	m.Evicted(4096)
	fams := scrape(t, m)
	tests := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"alephvm_cold_start_duration_seconds", map[string]string{"type": "program", "phase": "ready"}, 1},
		{"alephvm_cold_start_duration_seconds", map[string]string{"type": "program", "phase": "total"}, 1},
		{"alephvm_cold_start_failures_total", map[string]string{"type": "instance"}, 1},
		{"alephvm_program_requests_total", map[string]string{"code": "200"}, 2},
		{"alephvm_program_requests_total", map[string]string{"code": "503"}, 1},
		{"alephvm_program_request_duration_seconds", nil, 3},
		{"alephvm_allocation_requests_total", map[string]string{"route": "allocation_notify", "code": "401"}, 1},
		{"alephvm_downloads_total", nil, 2},
		{"alephvm_download_bytes_total", nil, 1024},
		{"alephvm_download_failures_total", nil, 1},
		{"alephvm_downloads_in_flight", nil, 1},
		{"alephvm_store_evictions_total", nil, 1},
		{"alephvm_store_evicted_bytes_total", nil, 4096},
	}
	for _, tt := range tests {
		if got, found := value(fams, tt.name, tt.labels); !found || got != tt.want {
			t.Errorf("%s%v = %v (found %v), want %v", tt.name, tt.labels, got, found, tt.want)
		}
	}
	if _, found := value(fams, "alephvm_cold_start_duration_seconds", map[string]string{"type": "instance"}); found {
		t.Error("a failed start is in the durations")
	}
	recent := m.Recent()
	if len(recent) != 2 || recent[0].Ref != "bb" || recent[1].Ref != "aa" {
		t.Errorf("recent: %+v", recent)
	}
	for i := range RecentStarts + 5 {
		m.ColdStart(execution.ColdStart{Ref: "x", Type: execution.TypeProgram, Total: time.Duration(i)})
	}
	if recent := m.Recent(); len(recent) != RecentStarts || recent[0].Total != RecentStarts+4 || recent[RecentStarts-1].Total != 5 {
		t.Errorf("recent after %d more: %d, newest %v", RecentStarts+5, len(recent), recent[0].Total)
	}
}

func TestProcParsers(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) {
		os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755)
		os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644)
	}
	write("7/stat", "7 (a) S 1\n")
	write("7/statm", "1 2\n")
	if _, err := readProcStat(dir, 7); err == nil {
		t.Error("a short stat was read")
	}
	write("8/stat", "8 no-parenthesis S\n")
	if _, err := readProcStat(dir, 8); err == nil {
		t.Error("a stat without a command name was read")
	}
	write("9/io", "read_bytes: 1\nwrite_bytes: x\nsyscr: 1\nsyscw: 1\n")
	if _, err := readProcIO(dir, 9); err == nil {
		t.Error("a bad io file was read")
	}
	write("net/dev", "h\nh\n avm1: 1 2 3\n")
	if _, err := readNetDev(dir); err == nil {
		t.Error("a short net/dev line was read")
	}
	// The real thing: this process and this namespace.
	st, err := readProcStat("/proc", os.Getpid())
	if err != nil || st.rssBytes == 0 {
		t.Errorf("this process: %+v %v", st, err)
	}
	if _, err := readProcIO("/proc", os.Getpid()); err != nil {
		t.Errorf("this process's io: %v", err)
	}
	if devs, err := readNetDev("/proc"); err != nil || len(devs) == 0 {
		t.Errorf("/proc/net/dev: %v %v", devs, err)
	}
}
