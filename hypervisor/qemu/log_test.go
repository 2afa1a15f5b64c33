package qemu

import (
	"os"
	"path/filepath"
	"testing"
)

// TestQEMULogSurvivesTruncation: once the log is truncated behind QEMU's
// back (logrotate's copytruncate), QEMU's next message lands at the start
// of the file, with no hole before it.
func TestQEMULogSurvivesTruncation(t *testing.T) {
	path := filepath.Join(t.TempDir(), QEMULog)
	os.WriteFile(path, []byte("an earlier run's messages\n"), 0o600)
	f, err := openQEMULog(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteString("first message\n")
	if data, _ := os.ReadFile(path); string(data) != "first message\n" {
		t.Errorf("the log of a new QEMU starts with %q", data)
	}
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	f.WriteString("after rotation\n")
	if data, _ := os.ReadFile(path); string(data) != "after rotation\n" {
		t.Errorf("after truncation the log holds %q", data)
	}
}

func TestLogTail(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, QEMULog)
	os.WriteFile(path, []byte("qemu-system-x86_64: terminating on signal 15 from pid 42 (kill)\n"), 0o600)
	for _, tc := range []struct {
		name, path string
		n          int64
		want       string
	}{
		{"whole", path, 1024, "qemu-system-x86_64: terminating on signal 15 from pid 42 (kill)"},
		{"its end", path, 10, "42 (kill)"},
		{"no log", filepath.Join(dir, "missing"), 1024, ""},
	} {
		if got := logTail(tc.path, tc.n); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}
