package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStorageCLI(t *testing.T) {
	dir := t.TempDir()
	exec := filepath.Join(dir, "state")
	environ := []string{"ALEPH_VM_CACHE_ROOT=" + filepath.Join(dir, "cache"), "ALEPH_VM_EXECUTION_ROOT=" + exec}
	// An instance erased while the node was down: its disks, no record.
	orphan := filepath.Join(exec, "volumes", strings.Repeat("e", 64))
	os.MkdirAll(orphan, 0o755)
	disk := filepath.Join(orphan, "inst-eeeeeeeeeeeeeeee.qcow2")
	f, _ := os.Create(disk)
	f.Write(make([]byte, 8192))
	f.Truncate(1 << 30)
	f.Close()
	old := time.Now().Add(-time.Hour)
	os.Chtimes(disk, old, old)

	code, out, errOut := runCLI(t, environ, "storage", "status")
	if code != 0 || !strings.Contains(out, "instance-disk") || !strings.Contains(out, "1.0 GiB") || !strings.Contains(out, "reclaimable: 1 items") {
		t.Fatalf("storage status: exit %d\n%s%s", code, out, errOut)
	}
	code, out, _ = runCLI(t, environ, "storage", "status", "--json")
	var rep struct {
		Kinds []struct {
			Kind      string `json:"kind"`
			Apparent  int64  `json:"apparent_bytes"`
			Allocated int64  `json:"allocated_bytes"`
		} `json:"kinds"`
		Reclaimable []struct{ Path string } `json:"reclaimable"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || len(rep.Reclaimable) != 1 || rep.Reclaimable[0].Path != orphan {
		t.Fatalf("storage status --json: exit %d\n%s", code, out)
	}
	code, out, _ = runCLI(t, environ, "storage", "reclaim")
	if _, err := os.Stat(disk); code != 0 || err != nil || !strings.Contains(out, "would remove "+orphan) || !strings.Contains(out, "--yes") {
		t.Fatalf("dry run: exit %d, %v\n%s", code, err, out)
	}
	code, out, _ = runCLI(t, environ, "storage", "reclaim", "--yes")
	if _, err := os.Stat(orphan); code != 0 || !os.IsNotExist(err) || !strings.Contains(out, "removed 1 items") {
		t.Fatalf("reclaim --yes: exit %d, %v\n%s", code, err, out)
	}
	code, out, _ = runCLI(t, environ, "storage", "reclaim", "--yes")
	if code != 0 || !strings.Contains(out, "removed 0 items, 0 B") {
		t.Fatalf("second reclaim: exit %d\n%s", code, out)
	}
	// The help says what the command does.
	code, out, _ = runCLI(t, environ, "storage", "reclaim", "--help")
	for _, want := range []string{"Without --yes", "DOWNLOAD_PART_MAX_AGE", "--json", "never"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("reclaim --help lacks %q:\n%s", want, out)
		}
	}
}
