package hostinfo

import (
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"
)

func TestRead(t *testing.T) {
	h, err := Reader{Root: "testdata/host"}.Read()
	if err != nil {
		t.Fatal(err)
	}
	want := Host{
		CPUs: 2, Load: [3]float64{0.52, 0.58, 0.59}, FreqMinMHz: 2445.405, FreqMaxMHz: 3100,
		MemTotal: 16384000 * 1024, MemAvailable: 8192000 * 1024, Arch: "x86_64", Vendor: "AuthenticAMD",
		Model: "AMD EPYC 7763 64-Core Processor", FrequencyHz: 3_100_000_000, Features: []string{"sev", "sev_es"},
	}
	if runtime.GOARCH != "amd64" {
		want.Arch = h.Arch
	}
	if !reflect.DeepEqual(h, want) {
		t.Errorf("got  %+v\nwant %+v", h, want)
	}
	if _, err := (Reader{}).Read(); err != nil {
		t.Errorf("this host: %v", err)
	}
}

func TestDiskCountsWhatSparseDisksMayTake(t *testing.T) {
	dir := t.TempDir()
	f, _ := os.Create(filepath.Join(dir, "root.qcow2"))
	f.Truncate(1 << 30) // a 1 GiB sparse disk, nothing written
	f.WriteAt(make([]byte, 1<<20), 0)
	f.Close()
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "full"), make([]byte, 4096), 0o644)
	promised, err := Promised(dir)
	if err != nil {
		t.Fatal(err)
	}
	if promised < 1<<30-(2<<20) || promised > 1<<30 {
		t.Errorf("promised %d, want about 1 GiB less 1 MiB", promised)
	}
	d, err := ReadDisk(dir, 0)
	if err != nil || d.Total <= 0 || d.Available < 0 {
		t.Fatalf("disk: %+v %v", d, err)
	}
	if _, err := Promised(filepath.Join(dir, "missing")); err != nil {
		t.Errorf("a missing directory: %v", err)
	}
}
