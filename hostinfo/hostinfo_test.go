package hostinfo

import (
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

func TestDiskTotal(t *testing.T) {
	if n, err := DiskTotal(t.TempDir()); err != nil || n <= 0 {
		t.Errorf("total %d %v", n, err)
	}
	if _, err := DiskTotal(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("a missing directory has a disk")
	}
}
