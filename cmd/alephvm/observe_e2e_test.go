package main

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/alephvm/alephvm/internal/testenv"
)

// createGoHello builds the Go example and creates it as a program on the
// node env points at, with the extra flags of program create, returning
// its ref.
func createGoHello(t testing.TB, env []string, dir string, extra ...string) string {
	t.Helper()
	goDir := filepath.Join(dir, "go-hello")
	os.MkdirAll(goDir, 0o755)
	build := exec.Command("go", "build", "-o", filepath.Join(goDir, "hello"), "../../examples/go-hello")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the Go example: %v\n%s", err, out)
	}
	code, out, errOut := runCLI(t, env, append([]string{"program", "create", goDir, "--entrypoint", "hello", "--interface", "binary", "--memory", "256"}, extra...)...)
	if code != 0 {
		t.Fatalf("program create: %s %s", out, errOut)
	}
	return strings.Fields(out)[0]
}

// scrapeNode reads the node's /metrics with the Prometheus text parser.
func scrapeNode(t *testing.T, port int) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse the scrape: %v", err)
	}
	return fams
}

// vmSeries returns the value and labels of family name's series for the VM
// ref.
func vmSeries(fams map[string]*dto.MetricFamily, name, ref string) (float64, map[string]string, bool) {
	f := fams[name]
	if f == nil {
		return 0, nil, false
	}
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["item_hash"] != ref {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), labels, true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), labels, true
		}
	}
	return 0, nil, false
}

// perVMFamilies are the series every running VM has.
var perVMFamilies = []string{
	"alephvm_vm_up", "alephvm_vm_uptime_seconds", "alephvm_vm_cpu_seconds_total",
	"alephvm_vm_memory_used_bytes", "alephvm_vm_memory_assigned_bytes", "alephvm_vm_vcpus",
	"alephvm_vm_disk_read_bytes_total", "alephvm_vm_disk_written_bytes_total",
	"alephvm_vm_disk_reads_completed_total", "alephvm_vm_disk_writes_completed_total",
	"alephvm_vm_network_receive_bytes_total", "alephvm_vm_network_transmit_bytes_total",
	"alephvm_vm_network_receive_packets_total", "alephvm_vm_network_transmit_packets_total",
}

// observedVM is a VM the observability checks expect, and what its work
// between two scrapes must have moved.
type observedVM struct {
	ref, typ string
	moved    []string // families that must grow between the scrapes
}

// checkMetrics checks that every per-VM series exists for each VM, with
// its type and hypervisor, before and after, and that the VMs' work moved
// what it should.
func checkMetrics(t *testing.T, before, after map[string]*dto.MetricFamily, vms []observedVM) {
	t.Helper()
	for _, vm := range vms {
		for _, name := range perVMFamilies {
			_, _, okBefore := vmSeries(before, name, vm.ref)
			v, labels, ok := vmSeries(after, name, vm.ref)
			if !ok || !okBefore {
				t.Errorf("%s %s: no %s series (before %v, after %v)", vm.typ, vm.ref, name, okBefore, ok)
				continue
			}
			if labels["type"] != vm.typ || labels["hypervisor"] != "qemu" {
				t.Errorf("%s %s: %s labels %v", vm.typ, vm.ref, name, labels)
			}
			if name == "alephvm_vm_up" && v != 1 {
				t.Errorf("%s %s: up %v", vm.typ, vm.ref, v)
			}
		}
		for _, name := range vm.moved {
			v0, _, _ := vmSeries(before, name, vm.ref)
			v1, _, _ := vmSeries(after, name, vm.ref)
			if v1 <= v0 {
				t.Errorf("%s %s: %s did not move while the VM worked: %v then %v", vm.typ, vm.ref, name, v0, v1)
			}
		}
	}
}

// checkStatusPage loads the node's status page in headless chromium while
// the VMs run, checks that it shows each of them, and saves a screenshot
// as a test artifact.
func checkStatusPage(t *testing.T, port int, refs []string, artifact string) {
	t.Helper()
	if _, err := exec.LookPath("chromium"); err != nil {
		t.Log("no chromium: the status page is not checked in a browser (apt-get install chromium)")
		return
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	dom, log := testenv.HeadlessDOM(t, url, 8*time.Second)
	for _, ref := range refs {
		if !strings.Contains(dom, ref) {
			t.Errorf("the status page does not show %s; chromium said:\n%s\nDOM:\n%s", ref, log, dom)
		}
	}
	if path := testenv.Artifact(t, artifact); path != "" {
		testenv.Screenshot(t, url, path, 1280, 1000, 2*time.Second)
		t.Logf("status page screenshot: %s", path)
	}
}
