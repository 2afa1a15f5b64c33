package firecracker

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// self stands, as the owner of a path in TestJailUIDsFree, for the test's
// own uid (no chown needed); gone for a path that does not exist.
const (
	self = -1
	gone = -2
)

// fakeProc writes a /proc with one process per uid of uids (as its uid
// and gid).
func fakeProc(t *testing.T, uids ...int) string {
	t.Helper()
	dir := t.TempDir()
	for i, uid := range uids {
		p := filepath.Join(dir, strconv.Itoa(100+i))
		status := fmt.Sprintf("Name:\tfirecracker\nUid:\t%d\t%d\t%d\t%d\nGid:\t%d\t%d\t%d\t%d\n", uid, uid, uid, uid, uid, uid, uid, uid)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "status"), []byte(status), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// makeOwned makes the directory path owned by owner (self: as it is).
func makeOwned(t *testing.T, path string, owner int) {
	t.Helper()
	if err := os.MkdirAll(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if owner != self {
		if err := os.Chown(path, owner, owner); err != nil {
			t.Fatal(err)
		}
	}
}

// records lists the uids recorded in dir.
func records(t *testing.T, dir string) []int {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var uids []int
	for _, e := range entries {
		if uid, err := strconv.Atoi(e.Name()); err == nil {
			uids = append(uids, uid)
		}
	}
	return uids
}

func TestJailUIDsFree(t *testing.T) {
	tests := []struct {
		name    string
		jails   []int       // owners of the jails under the node's base
		records map[int]int // uid -> owner of the path its record names
		procs   []int       // uids processes have
		want    int
		kept    []int // the records left, the others being stale
	}{
		{name: "nothing taken", want: 5000},
		{name: "jails under the base (a node restart)", jails: []int{5000, 5001, 5003}, want: 5002},
		{name: "a jail of another base, recorded", records: map[int]int{5000: 5000, 5001: 5001}, want: 5002, kept: []int{5000, 5001}},
		{name: "stale: the path is gone", records: map[int]int{5000: gone}, want: 5000},
		{name: "stale: the path is another uid's", records: map[int]int{5000: self}, want: 5000},
		{name: "stale: the path is the next uid's jail", jails: []int{5001}, records: map[int]int{5000: 5001}, want: 5000},
		{name: "a process has the uid", procs: []int{5000, 5001}, want: 5002},
		{name: "all at once", jails: []int{5000}, records: map[int]int{5001: 5001, 5002: gone, 5003: self}, procs: []int{5002}, want: 5003, kept: []int{5001}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			needsChown := len(tt.jails) > 0
			for _, owner := range tt.records {
				needsChown = needsChown || owner >= 0
			}
			if needsChown && os.Geteuid() != 0 {
				t.Skip("needs root to give jail roots their owners (chown)")
			}
			dir := t.TempDir()
			jails := filepath.Join(dir, "jail", "firecracker")
			for i, owner := range tt.jails {
				makeOwned(t, filepath.Join(jails, fmt.Sprint("vm", i), "root"), owner)
			}
			u := jailUIDs{first: 5000, records: filepath.Join(dir, "records"), proc: fakeProc(t, tt.procs...)}
			unlock, err := u.lock()
			if err != nil {
				t.Fatal(err)
			}
			defer unlock()
			for uid, owner := range tt.records {
				root := filepath.Join(dir, "other-base", "firecracker", fmt.Sprint("vm", uid), "root")
				if owner != gone {
					makeOwned(t, root, owner)
				}
				if err := u.record(uid, root); err != nil {
					t.Fatal(err)
				}
			}
			got, err := u.free(jails)
			if err != nil || got != tt.want {
				t.Errorf("free: %d %v, want %d", got, err, tt.want)
			}
			if kept := records(t, u.records); !slices.Equal(kept, tt.kept) {
				t.Errorf("records left %v, want %v", kept, tt.kept)
			}
		})
	}
}

// testJail is a jail of nothing but its root, under base.
func testJail(base, id string) *Jail {
	return &Jail{ID: id, Dir: filepath.Join(base, "firecracker", id), ExecName: "firecracker", Dirs: []JailDir{{"/", 0o700}}}
}

// jailDriver is a driver that only makes jails, recording their uids in
// records.
func jailDriver(first int, records string) *Driver {
	return &Driver{uids: jailUIDs{first: first, records: records, proc: "/proc"}}
}

// TestMakeJailRecordsUID: a jail's uid is recorded while the jail exists,
// seen by a node under another base, and forgotten with the jail.
func TestMakeJailRecordsUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a jail's root its owner (chown)")
	}
	dir := t.TempDir()
	recordDir := filepath.Join(dir, "records")
	node1, node2 := jailDriver(5000, recordDir), jailDriver(5000, recordDir)
	a, b := testJail(filepath.Join(dir, "base1"), "uidtest-a"), testJail(filepath.Join(dir, "base2"), "uidtest-b")
	if err := node1.makeJail(a); err != nil || a.UID != 5000 || a.GID != 5000 {
		t.Fatalf("node 1: uid %d gid %d, %v; want 5000", a.UID, a.GID, err)
	}
	if data, err := os.ReadFile(filepath.Join(recordDir, "5000")); err != nil || string(data) != a.Root()+"\n" {
		t.Errorf("record of 5000: %q %v, want %s", data, err, a.Root())
	}
	if st := stat(t, a.Root()); st.Uid != 5000 || st.Gid != 5000 {
		t.Errorf("jail root owned by %d:%d", st.Uid, st.Gid)
	}
	if err := node2.makeJail(b); err != nil || b.UID != 5001 {
		t.Fatalf("node 2, under another base: uid %d, %v; want 5001", b.UID, err)
	}
	if err := removeJail(a, node1.uids); err != nil {
		t.Fatal(err)
	}
	if got := records(t, recordDir); !slices.Equal(got, []int{5001}) {
		t.Errorf("records after removing node 1's jail: %v, want [5001]", got)
	}
	again := testJail(filepath.Join(dir, "base2"), "uidtest-c")
	if err := node2.makeJail(again); err != nil || again.UID != 5000 {
		t.Errorf("node 2 after node 1's jail went: uid %d, %v; want 5000", again.UID, err)
	}
	// A jail that cannot be made leaves no record.
	bad := testJail(filepath.Join(dir, "base1"), "uidtest-d")
	bad.Entries = []JailEntry{{Host: filepath.Join(dir, "no-such-file"), Path: "/x"}}
	if err := node1.makeJail(bad); err == nil {
		t.Error("a jail of a missing file was made")
	}
	if got := records(t, recordDir); !slices.Equal(got, []int{5000, 5001}) {
		t.Errorf("records after a failed jail: %v, want [5000 5001]", got)
	}
}

// uidChildEnv tells a re-executed test binary to make jails for
// TestJailUIDsAcrossProcesses: base, records, a name, a count and a file
// to wait for, separated by newlines.
const uidChildEnv = "ALEPHVM_TEST_JAIL_UID_CHILD"

// TestJailUIDsAcrossProcesses: node processes making jails at the same
// time, each under a base directory of its own (as the tests' nodes do)
// or under one, never give one uid to two jails: the uid records and
// their lock are host-wide.
func TestJailUIDsAcrossProcesses(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give jail roots their owners (chown)")
	}
	const nodes, jailsEach = 4, 25
	tests := []struct {
		name       string
		sharedBase bool
	}{
		{"a base each", false},
		{"one base", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			recordDir, start := filepath.Join(dir, "records"), filepath.Join(dir, "start")
			var cmds []*exec.Cmd
			var outs []*bytes.Buffer
			for i := range nodes {
				base := filepath.Join(dir, fmt.Sprint("base", i))
				if tt.sharedBase {
					base = filepath.Join(dir, "base")
				}
				cmd := exec.Command(os.Args[0], "-test.run=^TestJailUIDsChild$")
				cmd.Env = append(os.Environ(), uidChildEnv+"="+strings.Join([]string{base, recordDir, fmt.Sprint("node", i), fmt.Sprint(jailsEach), start}, "\n"))
				out := &bytes.Buffer{}
				cmd.Stdout, cmd.Stderr = out, out
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				cmds, outs = append(cmds, cmd), append(outs, out)
			}
			if err := os.WriteFile(start, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			owner := map[int]string{}
			for i, cmd := range cmds {
				if err := cmd.Wait(); err != nil {
					t.Fatalf("node %d: %v\n%s", i, err, outs[i])
				}
				sc := bufio.NewScanner(outs[i])
				for sc.Scan() {
					var uid int
					var id string
					if _, err := fmt.Sscanf(sc.Text(), "jail %s uid %d", &id, &uid); err != nil {
						continue
					}
					if other, ok := owner[uid]; ok {
						t.Errorf("uid %d given to two jails: %s and %s", uid, other, id)
					}
					owner[uid] = id
				}
			}
			if len(owner) != nodes*jailsEach {
				t.Errorf("%d uids handed out, want %d", len(owner), nodes*jailsEach)
			}
		})
	}
}

// TestJailUIDsChild is one node process of TestJailUIDsAcrossProcesses.
func TestJailUIDsChild(t *testing.T) {
	env := os.Getenv(uidChildEnv)
	if env == "" {
		t.Skip("run by TestJailUIDsAcrossProcesses")
	}
	args := strings.Split(env, "\n")
	base, recordDir, name, start := args[0], args[1], args[2], args[4]
	count, _ := strconv.Atoi(args[3])
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(start); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no start")
		}
	}
	d := jailDriver(1000000, recordDir)
	for i := range count {
		j := testJail(base, fmt.Sprintf("%s-%d", name, i))
		if err := d.makeJail(j); err != nil {
			t.Fatal(err)
		}
		fmt.Printf("jail %s uid %d\n", j.ID, j.UID)
	}
}
