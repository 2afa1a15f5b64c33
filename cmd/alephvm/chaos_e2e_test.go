package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
)

// The chaos suite: rounds of an operation at random, the node killed with
// SIGKILL at a random moment inside it (in some rounds one QEMU too, or
// all of them as a host crash would), the node started again, then the
// invariants of docs/reliability.md checked. ALEPHVM_CHAOS_ROUNDS sets the
// rounds (default 5, as CI runs it; scripts/chaos.sh runs 50),
// ALEPHVM_CHAOS_SEED the seed (printed, to replay a run).

// chaosOps are the operations a round starts.
var chaosOps = []string{"cold start", "allocation", "stop", "reboot", "reinstall", "erase", "download", "shutdown"}

// chaosConverge bounds the time the restarted node takes to reach the
// invariants.
const chaosConverge = 3 * time.Minute

// chaosStats are the suite's figures.
type chaosStats struct {
	ops                                    map[string]int
	nodeKills, qemuKills, hostCrashes      int
	orphans, corrupt, checkedDisks, lost   int
	acked, integrity, allocMisses, resumed int
	slowest                                time.Duration
}

type chaos struct {
	t       *testing.T
	rng     *rand.Rand
	dir     string
	port    int
	env     []string
	node    *nodeProcess
	core    *chaosCore
	prog    string   // the program with a persistent volume
	progDir string   // its built code
	insts   []string // the suite's instances
	// alloc is the last allocation the node answered; pending one it may
	// or may not have received before it was killed.
	alloc, pending []string
	allocSent      bool
	mu             sync.Mutex
	acked          []string // files the program said were synced
	downloads      []string // programs with a downloaded volume, not yet answered
	stats          chaosStats
}

func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs under emulation and kills the node")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img", "nft", "mkfs.ext4", "e2fsck", "debugfs", "mksquashfs", "losetup", "go")
	rounds := 5
	if s := os.Getenv("ALEPHVM_CHAOS_ROUNDS"); s != "" {
		rounds, _ = strconv.Atoi(s)
	}
	seed := rand.Uint64()
	if s := os.Getenv("ALEPHVM_CHAOS_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("chaos: %d rounds, ALEPHVM_CHAOS_SEED=%d", rounds, seed)
	c := &chaos{t: t, rng: rand.New(rand.NewPCG(seed, seed)), stats: chaosStats{ops: map[string]int{}}}
	c.core = newChaosCore(t)
	c.dir, c.port, c.env = nodeEnv(t, "lo", "10.0.0.53")
	c.env = append(c.env, "ALEPH_VM_ASSETS_DIR="+testassets.ProgramAssets(t), "ALEPH_VM_INIT_TIMEOUT=180",
		"ALEPH_VM_REUSE_TIMEOUT=600", "ALEPH_VM_API_SERVER="+c.core.URL, "ALEPH_VM_WATCH_FOR_MESSAGES=false")
	c.node = startNode(t, c.env, c.port)
	t.Cleanup(c.cleanup)
	c.setup()

	start := time.Now()
	for round := range rounds {
		c.round(round)
	}
	c.final()
	s := c.stats
	t.Logf("chaos: %d rounds in %s; operations %v", rounds, time.Since(start).Round(time.Second), s.ops)
	t.Logf("| rounds | node kills | QEMU kills | host crashes | orphans | corrupt disks | lost synced files | integrity failures | allocation misses | converged within |")
	t.Logf("| %d | %d | %d | %d | %d | %d (%d checked) | %d (%d acknowledged) | %d | %d | %s |", rounds, s.nodeKills, s.qemuKills, s.hostCrashes,
		s.orphans, s.corrupt, s.checkedDisks, s.lost, s.acked, s.integrity, s.allocMisses, s.slowest.Round(10*time.Millisecond))
	if s.resumed > 0 {
		t.Logf("chaos: %d interrupted downloads completed after the restart", s.resumed)
	}
}

// setup makes the suite's program and instances.
func (c *chaos) setup() {
	t := c.t
	c.progDir = filepath.Join(c.dir, "chaosprog")
	os.MkdirAll(c.progDir, 0o755)
	build := exec.Command("go", "build", "-o", filepath.Join(c.progDir, "chaosprog"), "./testdata/chaosprog")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the chaos program: %v\n%s", err, out)
	}
	c.prog = c.createProgram("mount=/data,name=data,size=16")

	// Instances boot a disk whose boot sector halts the CPU: QEMU, the
	// disks, the network and the records are all real, and the guest
	// costs no CPU.
	image := filepath.Join(c.dir, "halt.img")
	disk := make([]byte, 1<<20)
	copy(disk, []byte{0xfa, 0xf4, 0xeb, 0xfd}) // cli; hlt; jmp to hlt
	disk[510], disk[511] = 0x55, 0xaa
	if err := os.WriteFile(image, disk, 0o644); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		code, out, errOut := runCLI(t, c.env, "instance", "create", "--image", image, "--size", "64", "--memory", "128", "--name", fmt.Sprintf("chaos-%d", i))
		if code != 0 {
			t.Fatalf("instance create: %s %s", out, errOut)
		}
		c.insts = append(c.insts, strings.TrimSpace(out))
	}
}

// createProgram stores the chaos program with the given --volume.
func (c *chaos) createProgram(volume string) string {
	c.t.Helper()
	code, out, errOut := runCLI(c.t, c.env, "program", "create", c.progDir, "--entrypoint", "chaosprog", "--interface", "binary",
		"--memory", "128", "--seconds", "120", "--volume", volume)
	if code != 0 {
		c.t.Fatalf("program create: %s %s", out, errOut)
	}
	return strings.Fields(out)[0]
}

// round runs one operation, kills the node inside it, starts the node
// again and checks the invariants.
func (c *chaos) round(round int) {
	t := c.t
	op := chaosOps[c.rng.IntN(len(chaosOps))]
	c.stats.ops[op]++
	var dl string
	if op == "download" {
		// A new item each time, so that each download is one.
		dl = c.createProgram("mount=/opt/big,ref=" + c.core.addItem(t, c.dir, round))
	}
	if c.rng.IntN(2) == 0 {
		// A file written and synced before the kill: the program then
		// runs when the node (and perhaps its QEMU) is killed.
		c.write(fmt.Sprintf("pre%d", round))
	}
	// Every random choice is made here, in order, so that a seed replays
	// the run.
	inst := c.insts[c.rng.IntN(len(c.insts))]
	var subset []string
	for _, ref := range c.insts {
		if c.rng.IntN(2) == 0 {
			subset = append(subset, ref)
		}
	}
	delay := time.Duration(c.rng.Int64N(int64(3 * time.Second)))
	kill := c.rng.IntN(6)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.operate(op, round, dl, inst, subset)
	}()
	time.Sleep(delay)
	c.node.cmd.Process.Kill()
	c.node.cmd.Wait()
	c.stats.nodeKills++
	extra := ""
	switch {
	case kill == 0:
		c.hostCrash()
		extra = ", host crash"
	case kill <= 2:
		if pids := c.qemus(); len(pids) > 0 {
			pid := slices.Sorted(maps.Keys(pids))[c.rng.IntN(len(pids))]
			syscall.Kill(pid, syscall.SIGKILL)
			c.stats.qemuKills++
			extra = ", a QEMU killed (" + pids[pid] + ")"
		}
	}
	<-done
	t.Logf("round %d: %s, node killed after %s%s", round, op, delay.Round(time.Millisecond), extra)
	c.node = startNode(t, c.env, c.port)
	c.converge(round)
	if dl != "" {
		c.downloads = append(c.downloads, dl)
	}
	c.checkResting(round)
}

// operate runs op against the node; its outcome does not matter, the node
// is killed inside it.
func (c *chaos) operate(op string, round int, dl, inst string, subset []string) {
	client := &http.Client{Timeout: 2 * time.Minute}
	post := func(path string, body []byte) (int, error) {
		req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d%s", c.port, path), bytes.NewReader(body))
		req.Header.Set("X-Auth-Signature", "test")
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	switch op {
	case "cold start":
		c.write(fmt.Sprintf("r%d", round))
	case "allocation":
		c.pending = subset
		body, _ := json.Marshal(map[string]any{"instances": append([]string{}, subset...), "persistent_vms": []string{}})
		if status, err := post("/control/allocations", body); err == nil && status == 200 {
			c.alloc, c.pending, c.allocSent = subset, nil, true
		}
	case "stop", "reboot", "reinstall", "erase":
		post("/control/machine/"+inst+"/"+op, nil)
	case "download":
		if resp, err := client.Get(programURL(c.port, dl, "/")); err == nil {
			resp.Body.Close()
		}
	case "shutdown":
		c.node.cmd.Process.Signal(syscall.SIGTERM)
	}
}

// write asks the program to write and sync the file name, and remembers
// it when the program says it did.
func (c *chaos) write(name string) {
	resp, err := (&http.Client{Timeout: 2 * time.Minute}).Get(programURL(c.port, c.prog, "/write?name="+name))
	if err != nil {
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode == 200 && strings.HasPrefix(string(body), "written "+name) {
		c.mu.Lock()
		c.acked = append(c.acked, name)
		c.mu.Unlock()
	}
}

// hostCrash ends every QEMU of the suite and what a reboot of the host
// loses: taps and the node's nftables table.
func (c *chaos) hostCrash() {
	for pid := range c.qemus() {
		syscall.Kill(pid, syscall.SIGKILL)
		c.stats.qemuKills++
	}
	taps, _ := network.Taps()
	for _, tap := range taps {
		exec.Command("ip", "link", "del", tap).Run()
	}
	exec.Command("nft", "delete", "table", "inet", network.TableName).Run()
	c.stats.hostCrashes++
	// A killed process is gone once its parent or init reaped it.
	for deadline := time.Now().Add(10 * time.Second); len(c.qemus()) > 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
}

// qemus returns the suite's QEMU processes by pid, with their VM's name
// (prog-<ref> or inst-<ref>, 12 characters of the ref).
func (c *chaos) qemus() map[int]string {
	out := map[int]string{}
	entries, _ := os.ReadDir("/proc")
	nameRe := regexp.MustCompile(`guest=((prog|inst)-[0-9a-f]{12})`)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !bytes.Contains(cmdline, []byte("qemu-system")) || !bytes.Contains(cmdline, []byte(c.dir)) {
			continue
		}
		if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && strings.Contains(string(stat), ") Z ") {
			continue // a zombie: dead, waiting for its parent
		}
		if m := nameRe.FindSubmatch(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})); m != nil {
			out[pid] = string(m[1])
		} else {
			out[pid] = "?"
		}
	}
	return out
}

// converge waits until the restarted node meets the live invariants:
// QEMU processes and running records one to one, taps and rules only of
// running VMs, the last allocation running. It counts what is still
// wrong at the bound.
func (c *chaos) converge(round int) {
	start := time.Now()
	var problems []string
	for deadline := start.Add(chaosConverge); ; time.Sleep(250 * time.Millisecond) {
		problems = c.liveProblems()
		if len(problems) == 0 || time.Now().After(deadline) {
			break
		}
	}
	took := time.Since(start)
	if took > time.Second {
		c.t.Logf("round %d: the invariants held %s after the restart", round, took.Round(10*time.Millisecond))
	}
	if took > c.stats.slowest {
		c.stats.slowest = took
	}
	for _, p := range problems {
		if strings.HasPrefix(p, "allocation") {
			c.stats.allocMisses++
		} else {
			c.stats.orphans++
		}
		c.t.Errorf("round %d, %s after the restart: %s", round, chaosConverge, p)
	}
	if len(problems) > 0 {
		c.t.Logf("node logs:\n%s", c.node.logs.String())
	}
}

// liveProblems lists what breaks the live invariants now.
func (c *chaos) liveProblems() []string {
	var problems []string
	vms, err := c.list()
	if err != nil {
		return []string{"orphan check: " + err.Error()}
	}
	qemus := c.qemus()
	names := map[string]bool{}
	for pid, name := range qemus {
		names[name] = true
		if _, ok := vms[name]; !ok {
			problems = append(problems, fmt.Sprintf("QEMU %d (%s) runs no recorded execution", pid, name))
		}
	}
	for name := range vms {
		if !names[name] {
			problems = append(problems, fmt.Sprintf("recorded running execution %s has no QEMU", name))
		}
	}
	liveTaps, err := c.recordedTaps()
	if err != nil {
		return append(problems, "orphan check: "+err.Error())
	}
	taps, _ := network.Taps()
	for _, tap := range taps {
		if !liveTaps[tap] {
			problems = append(problems, "tap "+tap+" without a running VM")
		}
	}
	ruleset, _ := exec.Command("nft", "list", "table", "inet", network.TableName).CombinedOutput()
	for _, m := range regexp.MustCompile(`"(avm[0-9a-z-]+)"`).FindAllStringSubmatch(string(ruleset), -1) {
		if !liveTaps[m[1]] {
			problems = append(problems, "nftables rule for "+m[1]+" without a running VM")
		}
	}
	if c.allocSent {
		running := map[string]bool{}
		for name := range vms {
			if strings.HasPrefix(name, "inst-") {
				running[name] = true
			}
		}
		matches := func(refs []string) bool {
			if len(refs) != len(running) {
				return false
			}
			for _, ref := range refs {
				if !running["inst-"+ref[:12]] {
					return false
				}
			}
			return true
		}
		switch {
		case matches(c.alloc):
		case c.pending != nil && matches(c.pending):
			c.alloc, c.pending = c.pending, nil // it was received
		default:
			problems = append(problems, fmt.Sprintf("allocation %v not what runs (%v)", short(c.alloc), slices.Sorted(maps.Keys(running))))
		}
	}
	return problems
}

func short(refs []string) []string {
	out := make([]string, len(refs))
	for i, r := range refs {
		out[i] = r[:12]
	}
	return out
}

// recordedTaps returns the taps of the executions the node's records do
// not say are stopped.
func (c *chaos) recordedTaps() (map[string]bool, error) {
	conn, err := sql.Open("sqlite", "file:"+db.Path(filepath.Join(c.dir, "state")))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	rows, err := conn.Query(`SELECT tap FROM executions WHERE state != 'stopped' AND tap IS NOT NULL`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	taps := map[string]bool{}
	for rows.Next() {
		var tap string
		if err := rows.Scan(&tap); err != nil {
			return nil, err
		}
		taps[tap] = true
	}
	return taps, rows.Err()
}

// list returns the node's running executions by VM name.
func (c *chaos) list() (map[string]vmStatus, error) {
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(fmt.Sprintf("http://127.0.0.1:%d/v2/about/executions/list", c.port))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var byRef map[string]vmStatus
	if err := json.NewDecoder(resp.Body).Decode(&byRef); err != nil {
		return nil, err
	}
	out := map[string]vmStatus{}
	for ref, vm := range byRef {
		if !vm.Running {
			continue
		}
		prefix := "prog-"
		if slices.Contains(c.insts, ref) {
			prefix = "inst-"
		}
		out[prefix+ref[:12]] = vm
	}
	return out, nil
}

// checkResting checks what can be checked of VMs that do not run: the
// program's volume and the instances' disks are consistent, every
// acknowledged file is there; no loop device, mount or temporary file
// lacks an owner; the database and the store are sound; an interrupted
// download completes.
func (c *chaos) checkResting(round int) {
	t := c.t
	// The program is stopped so that its volume can be read.
	client := &http.Client{Timeout: 2 * time.Minute}
	for _, ref := range append([]string{c.prog}, c.downloads...) {
		req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/stop", c.port, ref), nil)
		req.Header.Set("X-Auth-Signature", "test")
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
		}
	}
	vms, err := c.list()
	if err != nil {
		t.Fatalf("round %d: list: %v", round, err)
	}
	volumes := filepath.Join(c.dir, "state", "volumes")
	entries, _ := os.ReadDir(volumes)
	for _, e := range entries {
		ref := e.Name()
		if len(ref) < 12 {
			continue
		}
		if _, running := vms["inst-"+ref[:12]]; running {
			continue
		}
		if _, running := vms["prog-"+ref[:12]]; running {
			continue
		}
		c.checkDisks(round, filepath.Join(volumes, ref), ref == c.prog)
	}
	c.checkLeftovers(round)
	c.checkDatabase(round)
	c.checkStore(round)
	// An interrupted download resumes: the program it was for answers,
	// and no partial file stays.
	for _, dl := range c.downloads {
		resp, err := client.Get(programURL(c.port, dl, "/"))
		if err != nil {
			t.Errorf("round %d: the program of an interrupted download: %v", round, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("round %d: the program of an interrupted download: %d %s", round, resp.StatusCode, body)
		}
		c.stats.resumed++
	}
	c.downloads = nil
	parts, _ := filepath.Glob(filepath.Join(c.dir, "cache", "tmp", "*.part"))
	for _, p := range parts {
		c.stats.orphans++
		t.Errorf("round %d: partial download %s stays after its item was downloaded", round, p)
	}
}

// checkDisks checks the disks of one VM that does not run.
func (c *chaos) checkDisks(round int, dir string, prog bool) {
	t := c.t
	files, _ := os.ReadDir(dir)
	for _, f := range files {
		path := filepath.Join(dir, f.Name())
		head := make([]byte, 2048)
		if fh, err := os.Open(path); err == nil {
			fh.Read(head)
			fh.Close()
		}
		var err error
		var out []byte
		switch {
		case bytes.HasPrefix(head, []byte("QFI\xfb")):
			// Exit status 3: leaked clusters only, which waste space and
			// lose nothing.
			out, err = exec.Command("qemu-img", "check", "-q", path).CombinedOutput()
			if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 3 {
				err = nil
			}
		case head[1080] == 0x53 && head[1081] == 0xef:
			out, err = c.fsck(path)
		default:
			continue
		}
		c.stats.checkedDisks++
		if err != nil {
			c.stats.corrupt++
			t.Errorf("round %d: %s is not consistent: %v\n%s", round, path, err, out)
		}
	}
	if !prog {
		return
	}
	// Read as the guest's next mount would: on a copy with its journal
	// replayed (a synced file may still be only in the journal).
	volume := filepath.Join(c.t.TempDir(), "data.ext4")
	if out, err := exec.Command("cp", "--sparse=always", filepath.Join(dir, "data.ext4"), volume).CombinedOutput(); err != nil {
		t.Errorf("round %d: copy the volume: %v %s", round, err, out)
		return
	}
	exec.Command("e2fsck", "-E", "journal_only", "-p", volume).Run()
	c.mu.Lock()
	acked := slices.Clone(c.acked)
	c.mu.Unlock()
	for _, name := range acked {
		out, err := exec.Command("debugfs", "-R", "cat /"+name, volume).Output()
		if err != nil || string(out) != "chaos "+name+"\n" {
			c.stats.lost++
			t.Errorf("round %d: acknowledged file %s: %q %v", round, name, out, err)
		}
	}
}

// fsck checks an ext4 image as the guest's next mount finds it: its
// journal replayed (on a copy), then every structure checked read-only.
func (c *chaos) fsck(path string) ([]byte, error) {
	cp := filepath.Join(c.t.TempDir(), "fsck.ext4")
	defer os.Remove(cp)
	if out, err := exec.Command("cp", "--sparse=always", path, cp).CombinedOutput(); err != nil {
		return out, err
	}
	exec.Command("e2fsck", "-E", "journal_only", "-p", cp).Run()
	return exec.Command("e2fsck", "-fn", cp).CombinedOutput()
}

// checkLeftovers looks for loop devices, mounts and temporary files of
// the node's directories that nothing owns.
func (c *chaos) checkLeftovers(round int) {
	t := c.t
	out, _ := exec.Command("losetup", "-l", "-n", "-O", "NAME,BACK-FILE").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, c.dir) {
			c.stats.orphans++
			t.Errorf("round %d: loop device without an owner: %s", round, line)
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	sc := bufio.NewScanner(bytes.NewReader(mounts))
	for sc.Scan() {
		if strings.Contains(sc.Text(), c.dir) {
			c.stats.orphans++
			t.Errorf("round %d: mount without an owner: %s", round, sc.Text())
		}
	}
	filepath.WalkDir(c.dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		name := d.Name()
		if strings.HasSuffix(name, ".tmp") || (strings.HasSuffix(name, ".part") && filepath.Base(filepath.Dir(path)) != "tmp") ||
			strings.HasPrefix(name, "add-") {
			c.stats.orphans++
			t.Errorf("round %d: temporary file without an owner: %s", round, path)
		}
		return nil
	})
}

// checkDatabase runs SQLite's integrity check on the node's database.
func (c *chaos) checkDatabase(round int) {
	path := db.Path(filepath.Join(c.dir, "state"))
	conn, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		c.t.Fatal(err)
	}
	defer conn.Close()
	var res string
	if err := conn.QueryRow("PRAGMA integrity_check").Scan(&res); err != nil || res != "ok" {
		c.stats.integrity++
		c.t.Errorf("round %d: database integrity: %q %v", round, res, err)
	}
}

// checkStore checks that every stored file matches its sha256.
func (c *chaos) checkStore(round int) {
	files, _ := os.ReadDir(filepath.Join(c.dir, "cache", "files"))
	for _, f := range files {
		fh, err := os.Open(filepath.Join(c.dir, "cache", "files", f.Name()))
		if err != nil {
			continue
		}
		h := sha256.New()
		io.Copy(h, fh)
		fh.Close()
		if sum := hex.EncodeToString(h.Sum(nil)); sum != f.Name() {
			c.stats.integrity++
			c.t.Errorf("round %d: stored file %s has sha256 %s", round, f.Name(), sum)
		}
	}
}

// final stops everything and checks every disk at rest.
func (c *chaos) final() {
	body, _ := json.Marshal(map[string]any{"instances": []string{}, "persistent_vms": []string{}})
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/control/allocations", c.port), bytes.NewReader(body))
	req.Header.Set("X-Auth-Signature", "test")
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
	c.alloc, c.pending, c.allocSent = nil, nil, true
	for _, ref := range c.insts {
		req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/stop", c.port, ref), nil)
		req.Header.Set("X-Auth-Signature", "test")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}
	c.checkResting(-1)
	c.node.cmd.Process.Signal(syscall.SIGTERM)
	c.node.cmd.Wait()
	c.mu.Lock()
	c.stats.acked = len(c.acked)
	c.mu.Unlock()
}

// cleanup kills what a failed run leaves.
func (c *chaos) cleanup() {
	if c.node != nil && c.node.cmd.ProcessState == nil {
		c.node.cmd.Process.Kill()
		c.node.cmd.Wait()
	}
	for pid := range c.qemus() {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// chaosCore serves STORE messages and their files as a core node does, at
// 32 MiB/s, so that a download lasts long enough to be killed.
type chaosCore struct {
	*httptest.Server
	mu       sync.Mutex
	messages map[string][]byte
	files    map[string]string // sha256 to path
}

func newChaosCore(t *testing.T) *chaosCore {
	c := &chaosCore{messages: map[string][]byte{}, files: map[string]string{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v0/messages/{hash}", func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		raw, ok := c.messages[r.PathValue("hash")]
		c.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintf(w, `{"status":"processed","message":%s}`, raw)
	})
	mux.HandleFunc("GET /api/v0/messages.json", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"messages":[],"pagination_page":1,"pagination_total":0,"pagination_per_page":20,"pagination_item":"messages"}`)
	})
	mux.HandleFunc("GET /api/v0/storage/raw/{hash}", func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		path, ok := c.files[r.PathValue("hash")]
		c.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		f, err := os.Open(path)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		defer f.Close()
		http.ServeContent(throttled{w}, r, "", time.Time{}, f)
	})
	c.Server = httptest.NewServer(mux)
	t.Cleanup(c.Close)
	return c
}

// throttled writes at most 1 MiB every 1/32 s.
type throttled struct{ http.ResponseWriter }

func (w throttled) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := min(len(p), 1<<20)
		m, err := w.ResponseWriter.Write(p[:chunk])
		n += m
		if err != nil {
			return n, err
		}
		p = p[chunk:]
		time.Sleep(time.Second / 32)
	}
	return n, nil
}

// addItem makes a 64 MiB squashfs of random bytes, serves it with a STORE
// message, and returns the message's hash.
func (c *chaosCore) addItem(t *testing.T, dir string, round int) string {
	t.Helper()
	src := filepath.Join(dir, fmt.Sprintf("item-%d", round))
	os.MkdirAll(src, 0o755)
	data := make([]byte, 64<<20)
	rand.NewChaCha8([32]byte{byte(round), byte(round >> 8)}).Read(data)
	os.WriteFile(filepath.Join(src, "big"), data, 0o644)
	img := src + ".squashfs"
	if out, err := exec.Command("mksquashfs", src, img, "-noappend", "-quiet", "-no-progress").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v %s", err, out)
	}
	os.RemoveAll(src)
	f, _ := os.Open(img)
	h := sha256.New()
	size, _ := io.Copy(h, f)
	f.Close()
	sum := hex.EncodeToString(h.Sum(nil))
	content := map[string]any{"address": "0xchaos", "time": 1700000000.5 + float64(round), "item_type": "storage", "item_hash": sum, "size": size}
	doc, _ := json.Marshal(map[string]any{"chain": "ETH", "sender": "0xchaos", "type": "STORE", "signature": "0xsig",
		"time": content["time"], "item_type": "inline", "content": content})
	raw, err := message.Regenerate(doc)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := message.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.messages[string(msg.ItemHash)] = raw
	c.files[sum] = img
	c.mu.Unlock()
	return string(msg.ItemHash)
}
