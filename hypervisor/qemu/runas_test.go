package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// fakeProc writes a /proc with a process per entry of ids (its uid, gid).
func fakeProc(t *testing.T, ids map[int][2]int) string {
	t.Helper()
	dir := t.TempDir()
	for pid, id := range ids {
		p := filepath.Join(dir, fmt.Sprint(pid))
		os.MkdirAll(p, 0o755)
		status := fmt.Sprintf("Name:\tqemu-system-x86\nUid:\t%d\t%d\t%d\t%d\nGid:\t%d\t%d\t%d\t%d\nSeccomp:\t2\n", id[0], id[0], id[0], id[0], id[1], id[1], id[1], id[1])
		if err := os.WriteFile(filepath.Join(p, "status"), []byte(status), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(dir, "self"), 0o755)   // not a pid
	os.MkdirAll(filepath.Join(dir, "999999"), 0o755) // gone: no status
	return dir
}

func TestUIDRange(t *testing.T) {
	// Two QEMUs of an earlier node run as the range's first uids, and a
	// process elsewhere has a gid in it.
	proc := fakeProc(t, map[int][2]int{10: {0, 0}, 11: {500, 500}, 12: {2000, 2000}, 13: {2001, 2001}, 14: {7, 2002}})
	r := &uidRange{first: 2000, count: 5, proc: proc, locks: t.TempDir(), starting: map[int]*os.File{}}
	a, err := r.take()
	if err != nil || a != 2003 {
		t.Fatalf("first take: %d %v, want 2003", a, err)
	}
	b, err := r.take()
	if err != nil || b != 2004 {
		t.Fatalf("second take while the first starts: %d %v, want 2004", b, err)
	}
	if _, err := r.take(); err == nil || !strings.Contains(err.Error(), "all 5 uids") {
		t.Errorf("exhausted range: %v", err)
	}
	r.release(a)
	if again, err := r.take(); err != nil || again != a {
		t.Errorf("after a release: %d %v, want %d", again, err, a)
	}
}

func TestUIDRangeConcurrentTakesDiffer(t *testing.T) {
	r := &uidRange{first: 3000, count: 100, proc: fakeProc(t, nil), locks: t.TempDir(), starting: map[int]*os.File{}}
	var mu sync.Mutex
	seen := map[int]bool{}
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			uid, err := r.take()
			mu.Lock()
			defer mu.Unlock()
			if err != nil || seen[uid] {
				t.Errorf("take: %d %v (seen %v)", uid, err, seen[uid])
			}
			seen[uid] = true
		}()
	}
	wg.Wait()
}

// TestUIDRangeAcrossProcesses: two node processes of one host (two
// ranges, as in two processes, with one /proc and one lock directory)
// never hand out one uid, although neither sees the other's QEMU in /proc
// before it has dropped to its uid.
func TestUIDRangeAcrossProcesses(t *testing.T) {
	proc, locks := fakeProc(t, nil), t.TempDir()
	node1 := &uidRange{first: 2000, count: 5, proc: proc, locks: locks, starting: map[int]*os.File{}}
	node2 := &uidRange{first: 2000, count: 5, proc: proc, locks: locks, starting: map[int]*os.File{}}
	a, err := node1.take()
	if err != nil || a != 2000 {
		t.Fatalf("node 1: %d %v, want 2000", a, err)
	}
	b, err := node2.take()
	if err != nil || b != 2001 {
		t.Fatalf("node 2 while node 1 starts a QEMU as %d: %d %v, want 2001", a, b, err)
	}
	// Node 1's QEMU now runs as 2000; node 2's failed to start.
	if err := os.MkdirAll(filepath.Join(proc, "20"), 0o755); err != nil {
		t.Fatal(err)
	}
	status := "Uid:\t2000\t2000\t2000\t2000\nGid:\t2000\t2000\t2000\t2000\n"
	if err := os.WriteFile(filepath.Join(proc, "20", "status"), []byte(status), 0o644); err != nil {
		t.Fatal(err)
	}
	node1.release(a)
	node2.release(b)
	if c, err := node2.take(); err != nil || c != 2001 {
		t.Errorf("node 2 after node 1's QEMU dropped to %d: %d %v, want 2001", a, c, err)
	}
}

func TestRunAsPolicy(t *testing.T) {
	perVM, err := newRunAsPolicy(RunAsPerVM, 0)
	if err != nil || perVM.uids.first != DefaultFirstUID || perVM.uids.locks != uidLockDir {
		t.Fatalf("per VM: %+v %v", perVM, err)
	}
	perVM.uids.locks = t.TempDir()
	id, release, err := perVM.take()
	if err != nil || id.uid < DefaultFirstUID || id.uid >= DefaultFirstUID+UIDs || id.runAs != fmt.Sprintf("%d:%d", id.uid, id.uid) {
		t.Errorf("per VM identity %+v %v", id, err)
	}
	release()

	root, err := newRunAsPolicy(RunAsRoot, 0)
	if err != nil {
		t.Fatal(err)
	}
	if id, _, _ := root.take(); id.runAs != "" || id.uid != 0 {
		t.Errorf("root identity %+v", id)
	}
	if nobody, err := newRunAsPolicy("nobody", 0); err == nil {
		if id, _, _ := nobody.take(); id.runAs != "nobody" || id.uid == 0 {
			t.Errorf("nobody identity %+v", id)
		}
	}
	for _, bad := range []string{"0:0", "5:0", "0:5", "no-such-user-here", "a:b", "-1:-1"} {
		if p, err := newRunAsPolicy(bad, 0); err == nil {
			t.Errorf("run as %q accepted: %+v", bad, p)
		}
	}
	if _, err := newRunAsPolicy(RunAsPerVM, -5); err == nil {
		t.Error("a negative first uid accepted")
	}
	if d, err := Describe(RunAsRoot, 0); err != nil || !strings.Contains(d, "debugging only") {
		t.Errorf("describe root: %s %v", d, err)
	}
	if _, err := Describe("0:0", 0); err == nil {
		t.Error("describe uid 0: no error")
	}
}

func TestCheckProcess(t *testing.T) {
	// This test process is not sandboxed: the check says so, and says
	// which uid it runs as.
	err := checkProcess(os.Getpid(), identity{uid: 1234567, gid: 1234567})
	if err == nil || !strings.Contains(err.Error(), "not 1234567:1234567") || !strings.Contains(err.Error(), "no seccomp filter") {
		t.Errorf("check of an unsandboxed process: %v", err)
	}
}
