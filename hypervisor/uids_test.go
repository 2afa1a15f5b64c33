package hypervisor

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestUIDsInUse(t *testing.T) {
	proc := t.TempDir()
	for pid, status := range map[string]string{
		"10":   "Name:\tinit\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n",
		"11":   "Name:\tfirecracker\nUid:\t2000\t2000\t2000\t2000\nGid:\t2000\t2000\t2000\t2000\n",
		"12":   "Name:\tdropping\nUid:\t0\t2003\t0\t2003\nGid:\t7\t7\t7\t7\n",
		"13":   "Name:\tother\nUid:\t7\t7\t7\t7\nGid:\t2001\t2001\t2001\t2001\n",
		"self": "Uid:\t2002\t2002\t2002\t2002\n", // not a pid
	} {
		os.MkdirAll(filepath.Join(proc, pid), 0o755)
		if err := os.WriteFile(filepath.Join(proc, pid, "status"), []byte(status), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(proc, "999999"), 0o755) // gone: no status
	tests := []struct {
		name         string
		first, count int
		want         map[int]bool
	}{
		{"the range", 2000, 5, map[int]bool{2000: true, 2001: true, 2003: true}},
		{"part of it", 2001, 2, map[int]bool{2001: true}},
		{"root's", 0, 1, map[int]bool{0: true}},
		{"none", 3000, 10, map[int]bool{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := UIDsInUse(proc, tt.first, tt.count)
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %v %v, want %v", got, err, tt.want)
			}
		})
	}
	if _, err := UIDsInUse(filepath.Join(proc, "none"), 0, 1); err == nil {
		t.Error("no error for a missing /proc")
	}
}
