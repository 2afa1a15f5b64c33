package storage

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// durableOpEnv makes TestDurableHelper make one disk, in the directory
// durableOpEnv+"_DIR", for TestDisksAreSyncedAroundRename to trace.
const durableOpEnv = "STORAGE_TEST_DURABLE_OP"

func TestDurableHelper(t *testing.T) {
	op, dir := os.Getenv(durableOpEnv), os.Getenv(durableOpEnv+"_DIR")
	if op == "" {
		t.Skip("run by TestDisksAreSyncedAroundRename")
	}
	ctx := context.Background()
	var err error
	switch op {
	case "volume":
		err = (Disks{}).CreateVolume(ctx, filepath.Join(dir, "disk"), 16, "")
	case "overlay":
		err = (Disks{}).CreateOverlay(ctx, Image{Path: filepath.Join(dir, "src"), Format: FormatRaw}, filepath.Join(dir, "disk"), 16)
	case "clone":
		_, err = CloneFile(filepath.Join(dir, "src"), filepath.Join(dir, "disk"))
	case "file":
		err = WriteFileDurable(filepath.Join(dir, "disk"), []byte("state"), 0o600)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestDisksAreSyncedAroundRename traces the system calls of each way a
// disk is made under a temporary name and renamed into place, and checks
// that the node itself (not only the tool that wrote it) syncs the file
// before the rename and its directory after.
func TestDisksAreSyncedAroundRename(t *testing.T) {
	testenv.RequireTools(t, "strace", "qemu-img", "mkfs.ext4")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range []string{"volume", "overlay", "clone", "file"} {
		t.Run(op, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "src"), make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			trace := filepath.Join(t.TempDir(), "trace")
			cmd := exec.Command("strace", "-f", "-y", "-o", trace, "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,execve,clone,clone3,fork,vfork",
				exe, "-test.run=^TestDurableHelper$", "-test.count=1")
			cmd.Env = append(os.Environ(), durableOpEnv+"="+op, durableOpEnv+"_DIR="+dir)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if _, err := os.Stat(filepath.Join(dir, "disk")); err != nil {
				t.Fatal(err)
			}
			log, _ := os.ReadFile(trace)
			calls := nodeCalls(string(log), exe)
			tmp, disk := filepath.Join(dir, "disk.tmp"), filepath.Join(dir, "disk")
			// A call another thread interrupts ends in "<unfinished ...>"
			// rather than ")", hence no closing parenthesis here.
			want := []*regexp.Regexp{
				regexp.MustCompile(`^f(data)?sync\(\d+<` + regexp.QuoteMeta(tmp) + `>`),
				regexp.MustCompile(`^rename(at2?)?\(.*"` + regexp.QuoteMeta(tmp) + `".*"` + regexp.QuoteMeta(disk) + `"`),
				regexp.MustCompile(`^f(data)?sync\(\d+<` + regexp.QuoteMeta(dir) + `>`),
			}
			i := 0
			for _, c := range calls {
				if i < len(want) && want[i].MatchString(c) {
					i++
				}
			}
			if i < len(want) {
				t.Errorf("no %s in the node's calls, in this order (%d found):\n%s", want[i], i, strings.Join(calls, "\n"))
			}
		})
	}
}

// nodeCalls returns the calls in an strace -f log made by the process
// that runs exe (any of its threads), without those of the programs it
// runs (qemu-img, mkfs) and their threads, which sync on their own.
func nodeCalls(log, exe string) []string {
	line := regexp.MustCompile(`^(\d+)\s+(.*)$`)
	cloned := regexp.MustCompile(`^(clone3?|<\.\.\. clone3? resumed>|fork|vfork).*= (\d+)$`)
	parent, tool := map[string]string{}, map[string]bool{}
	var lines [][]string
	for _, l := range strings.Split(log, "\n") {
		m := line.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		lines = append(lines, m)
		if c := cloned.FindStringSubmatch(m[2]); c != nil {
			parent[c[2]] = m[1]
		}
		if strings.HasPrefix(m[2], "execve(") && !strings.HasPrefix(m[2], `execve("`+exe+`"`) {
			tool[m[1]] = true
		}
	}
	isTool := func(pid string) bool {
		for ; pid != ""; pid = parent[pid] {
			if tool[pid] {
				return true
			}
		}
		return false
	}
	var calls []string
	for _, m := range lines {
		if !isTool(m[1]) && !strings.HasPrefix(m[2], "<...") && !strings.HasPrefix(m[2], "+++") && !strings.HasPrefix(m[2], "---") &&
			!strings.HasPrefix(m[2], "clone") {
			calls = append(calls, m[2])
		}
	}
	return calls
}

func TestRemoveLeftovers(t *testing.T) {
	dir := t.TempDir()
	vm := filepath.Join(dir, "0123abcd")
	os.MkdirAll(filepath.Join(vm, "cidata-123.tmp"), 0o755)
	for _, f := range []string{"rootfs.qcow2", "rootfs.qcow2.tmp", "cidata.iso.tmp", "cidata.iso", "data.ext4"} {
		os.WriteFile(filepath.Join(vm, f), nil, 0o600)
	}
	removed, err := RemoveLeftovers(dir)
	if err != nil || len(removed) != 3 {
		t.Fatalf("removed %v, %v", removed, err)
	}
	left, _ := os.ReadDir(vm)
	var names []string
	for _, e := range left {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "cidata.iso data.ext4 rootfs.qcow2" {
		t.Errorf("left: %v", names)
	}
	if removed, err := RemoveLeftovers(filepath.Join(dir, "none")); err != nil || removed != nil {
		t.Errorf("a missing directory: %v %v", removed, err)
	}
}
