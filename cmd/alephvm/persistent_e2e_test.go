package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

// allocate posts an allocation as the scheduler does.
func allocate(t *testing.T, port int, persistent []string) (int, string) {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"persistent_vms": persistent, "instances": []string{}})
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/control/allocations", port), bytes.NewReader(body))
	req.Header.Set("X-Auth-Signature", "test")
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out bytes.Buffer
	out.ReadFrom(resp.Body)
	return resp.StatusCode, out.String()
}

// tryGet GETs url, telling a failure rather than failing the test: the VM
// may be between two lives.
func tryGet(url string) (string, bool) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", false
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return b.String(), resp.StatusCode == 200
}

// qemuPID is the pid of the QEMU running VM ref, or 0.
func qemuPID(ref string) int {
	out, _ := exec.Command("pgrep", "-f", "prog-"+ref[:12]).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); bytes.Contains(cmdline, []byte("qemu-system")) {
				return pid
			}
		}
	}
	return 0
}

// TestPersistentProgramEndToEnd: a persistent program is started by an
// allocation and answers without a first request, is started again after
// its QEMU is killed, and stops when the
// allocation drops it; its VM outlives a restart of the node, which takes
// it back. An ordinary program in persistent_vms is refused.
func TestPersistentProgramEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots program VMs under emulation")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "nft", "mkfs.ext4", "go", "pgrep")
	assetsDir := testassets.ProgramAssets(t)
	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_INIT_TIMEOUT=180", "ALEPH_VM_REUSE_TIMEOUT=1")
	node := startNode(t, env, port)
	defer func() {
		node.cmd.Process.Signal(syscall.SIGTERM)
		node.cmd.Wait()
	}()
	ref := createGoHello(t, env, dir, "--persistent")
	// A persistent program outlives its node: one left by a failure is
	// killed after the node's stop.
	t.Cleanup(func() {
		if pid := qemuPID(ref); pid != 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	ordinary := createGoHello(t, env, dir)

	if status, body := allocate(t, port, []string{ordinary}); status != 400 || !strings.Contains(body, "not a persistent program") {
		t.Errorf("an ordinary program in persistent_vms: %d %s", status, body)
	}
	if status, body := allocate(t, port, []string{ref}); status != 200 || !strings.Contains(body, ref) {
		t.Fatalf("allocation: %d %s\n%s", status, body, node.logs.String())
	}
	// Running without any request through the node: it answers on its own
	// address, and the lists call it a persistent program.
	answers := func(what string) string {
		t.Helper()
		var ip string
		deadline := time.Now().Add(3 * time.Minute)
		for ; time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
			vms := listVMs(t, port)
			if vm, ok := vms[ref]; ok && vm.Running && vm.Networking.IPv4 != "" {
				ip = vm.Networking.IPv4
				if body, ok := tryGet("http://" + ip + ":8080/"); ok && strings.HasPrefix(body, "Hello from a Go program") {
					return ip
				}
			}
		}
		t.Fatalf("%s: the persistent program does not answer (ip %q)\n%s", what, ip, node.logs.String())
		return ""
	}
	answers("after the allocation")
	_, list := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/about/executions/list", port))
	if !strings.Contains(list, `"vm_type":"persistent_program"`) {
		t.Errorf("executions list: %s", list)
	}
	time.Sleep(2 * time.Second) // past REUSE_TIMEOUT: it is not stopped for being idle
	pid := qemuPID(ref)
	if pid == 0 {
		t.Fatalf("no QEMU for %s after the reuse timeout", ref)
	}

	// kill -9 of its QEMU: started again.
	syscall.Kill(pid, syscall.SIGKILL)
	answers("after kill -9 of its QEMU")
	if again := qemuPID(ref); again == 0 || again == pid {
		t.Errorf("QEMU pid %d after the kill of %d", again, pid)
	}

	// A node restart: the VM runs on and the new node takes it back.
	before := qemuPID(ref)
	node.cmd.Process.Signal(syscall.SIGTERM)
	node.cmd.Wait()
	if qemuPID(ref) != before {
		t.Fatalf("the persistent program's QEMU did not outlive the node (pid %d, then %d)", before, qemuPID(ref))
	}
	node = startNode(t, env, port)
	answers("after a node restart")
	if after := qemuPID(ref); after != before {
		t.Errorf("QEMU pid %d after the restart, was %d: booted again instead of taken back\n%s", after, before, node.logs.String())
	}

	// Dropped from the allocation: stopped.
	if status, body := allocate(t, port, []string{}); status != 200 {
		t.Errorf("empty allocation: %d %s", status, body)
	}
	deadline := time.Now().Add(time.Minute)
	for qemuPID(ref) != 0 || len(listVMs(t, port)) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("still running after the drop: %v\n%s", listVMs(t, port), node.logs.String())
		}
		time.Sleep(500 * time.Millisecond)
	}
}
