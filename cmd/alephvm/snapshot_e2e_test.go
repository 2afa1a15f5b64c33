package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

// snapAnswer is testdata/snapprog's answer.
type snapAnswer struct {
	MAC     string   `json:"mac"`
	Addrs   []string `json:"addrs"`
	Random  string   `json:"random"`
	URandom string   `json:"urandom"`
	TimeNS  int64    `json:"time_ns"`
	Env     string   `json:"env"`
	hostNS  int64
}

// TestProgramSnapshots: a program restored from a template answers like a
// booted one; two restored at once from one template differ in MAC,
// addresses and random output and each has the wall clock; another runtime
// builds another template; a corrupt template is dropped and the program
// boots.
func TestProgramSnapshots(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	assetsDir := testassets.ProgramAssets(t)
	testenv.RequireTools(t, "nft", "mkfs.ext4", "go")
	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_REUSE_TIMEOUT=600", "ALEPH_VM_INIT_TIMEOUT=180",
		"ALEPH_VM_PROGRAM_HYPERVISOR=qemu", "ALEPH_VM_PROGRAM_SNAPSHOTS=true", "ALEPH_VM_PROGRAM_SNAPSHOTS_PER_PROGRAM=true")
	node := startNode(t, env, port)

	progDir := filepath.Join(dir, "snapprog")
	build := exec.Command("go", "build", "-o", filepath.Join(progDir, "snapprog"), "./testdata/snapprog")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build snapprog: %v\n%s", err, out)
	}
	create := func(name string, extra ...string) string {
		t.Helper()
		args := append([]string{"program", "create", progDir, "--entrypoint", "snapprog", "--interface", "binary", "--env", "SNAP=" + name}, extra...)
		code, out, errOut := runCLI(t, env, args...)
		if code != 0 {
			t.Fatalf("program create %s: %s %s", name, out, errOut)
		}
		return strings.Fields(out)[0]
	}
	ask := func(ref string) snapAnswer {
		t.Helper()
		status, body := httpGet(t, programURL(port, ref, "/"))
		var a snapAnswer
		a.hostNS = time.Now().UnixNano()
		if status != 200 || json.Unmarshal([]byte(body), &a) != nil {
			net, _ := exec.Command("sh", "-c", "ip neigh; ip -br addr; ip route").CombinedOutput()
			t.Fatalf("program %s: %d %q\n%s\n%s", ref, status, body, net, node.logs.String())
		}
		return a
	}
	waitLog := func(what string, n int) {
		t.Helper()
		for deadline := time.Now().Add(4 * time.Minute); strings.Count(node.logs.String(), what) < n; time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no %d× %q in the node's log:\n%s", n, what, node.logs.String())
			}
		}
	}

	// The first program boots, and its template is built meanwhile.
	booted := ask(create("a"))
	waitLog(`msg="template built"`, 1)

	// Two programs at once, both restored from that template.
	refs := []string{create("b"), create("c")}
	answers := make([]snapAnswer, 2)
	var wg sync.WaitGroup
	for i, ref := range refs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = ask(ref)
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for _, ref := range refs {
		if !restoredInLog(node.logs.String(), ref) {
			t.Errorf("program %s was not restored from the template:\n%s", ref, node.logs.String())
		}
	}
	b, c := answers[0], answers[1]
	for name, a := range map[string]snapAnswer{"booted": booted, "restored b": b, "restored c": c} {
		if a.MAC == "" || len(a.Addrs) == 0 || len(a.Random) != 64 || len(a.URandom) != 64 {
			t.Errorf("%s answered %+v", name, a)
		}
		if d := time.Duration(a.hostNS - a.TimeNS); name != "booted" && (d < -time.Second || d > time.Second) {
			t.Errorf("%s: the guest's clock is %v off the host's", name, d)
		}
	}
	if b.Env != "b" || c.Env != "c" {
		t.Errorf("environments %q and %q, want b and c", b.Env, c.Env)
	}
	if b.MAC == c.MAC || strings.Join(b.Addrs, ",") == strings.Join(c.Addrs, ",") {
		t.Errorf("two restored VMs share a MAC or addresses: %v %v / %v %v", b.MAC, b.Addrs, c.MAC, c.Addrs)
	}
	if b.Random == c.Random || b.URandom == c.URandom {
		t.Errorf("two restored VMs drew the same random bytes: %s %s / %s %s", b.Random, b.URandom, c.Random, c.URandom)
	}

	// Each restored program then has a snapshot of its own built; its next
	// cold start restores from it, with a network of its own and the
	// host's clock, and the two differ in their random bytes still.
	waitLog(`msg="template built"`, 3)
	waitLog(`program=`+refs[0], 1)
	waitLog(`program=`+refs[1], 1)
	for _, ref := range refs {
		if status, body := operatorPost(t, fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/stop", port, ref)); status != 200 {
			t.Fatalf("stop %s: %d %s", ref, status, body)
		}
	}
	var again [2]snapAnswer
	for i, ref := range refs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			again[i] = ask(ref)
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if n := strings.Count(node.logs.String(), `program_snapshot=true qemu_and_state=`); n != 2 {
		t.Errorf("%d restores from programs' own snapshots, want 2:\n%s", n, node.logs.String())
	}
	if again[0].Env != "b" || again[1].Env != "c" || again[0].MAC == again[1].MAC || again[0].Random == again[1].Random || again[0].URandom == again[1].URandom {
		t.Errorf("restored from their own snapshots: %+v / %+v", again[0], again[1])
	}
	for _, a := range again {
		if d := time.Duration(a.hostNS - a.TimeNS); d < -time.Second || d > time.Second {
			t.Errorf("a program restored from its snapshot: the guest's clock is %v off the host's", d)
		}
	}

	// Another runtime (the same squashfs, one more block: another hash)
	// builds a template of its own.
	runtime := filepath.Join(dir, "runtime2.squashfs")
	data, err := os.ReadFile(filepath.Join(assetsDir, "runtime", firstFile(t, filepath.Join(assetsDir, "runtime"))))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(runtime, append(data, make([]byte, 4096)...), 0o644); err != nil {
		t.Fatal(err)
	}
	ask(create("d", "--runtime", runtime))
	waitLog(`msg="template built"`, 4)

	// A corrupt template is dropped, and the program boots.
	node.cmd.Process.Signal(syscall.SIGTERM)
	node.cmd.Wait()
	mems, _ := filepath.Glob(filepath.Join(dir, "cache", "templates", "*", "memory"))
	if len(mems) != 4 {
		t.Fatalf("%d template memory files, want 4 (2 templates, 2 programs' snapshots)", len(mems))
	}
	for _, m := range mems {
		f, err := os.OpenFile(m, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte("corrupt"), 1<<20)
		f.Close()
	}
	node = startNode(t, env, port)
	if a := ask(create("e")); a.Env != "e" {
		t.Errorf("after the corruption: %+v", a)
	}
	waitLog(`msg="template unusable: dropped, to be built again"`, 1)
}

// restoredInLog reports whether the node logged the restore of ref.
func restoredInLog(logs, ref string) bool {
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, "program VM restored from its template") && strings.Contains(line, ref) {
			return true
		}
	}
	return false
}

// firstFile is the name of the only file in dir.
func firstFile(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) == 0 {
		t.Fatalf("no file in %s: %v", dir, err)
	}
	return entries[0].Name()
}
