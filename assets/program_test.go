package assets

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFindProgramKernel(t *testing.T) {
	set := ProgramKernel{BzImage: "/k", Vmlinux: "/v", Initrd: "/i"}
	// All three set: the assets directory is not read at all.
	if k, err := FindProgramKernel("/nonexistent", set); err != nil || k != set {
		t.Errorf("all set: %+v %v", k, err)
	}

	dir := t.TempDir()
	m, _ := Load(dir)
	for _, name := range []Name{KernelBzImage, KernelVmlinux, Initramfs} {
		os.WriteFile(filepath.Join(dir, string(name)), []byte(name), 0o644)
		if _, err := m.record(name, string(name), "k", "v"); err != nil {
			t.Fatal(err)
		}
	}
	k, err := FindProgramKernel(dir, ProgramKernel{Initrd: "/mine"})
	want := ProgramKernel{BzImage: filepath.Join(dir, "kernel.bzimage"), Vmlinux: filepath.Join(dir, "kernel.vmlinux"), Initrd: "/mine"}
	if err != nil || k != want {
		t.Errorf("built: %+v %v", k, err)
	}

	// The vmlinux recorded but gone: the others are found, its absence said.
	os.Remove(filepath.Join(dir, "kernel.vmlinux"))
	k, err = FindProgramKernel(dir, ProgramKernel{})
	if err == nil || !strings.Contains(err.Error(), "kernel.vmlinux") || k.BzImage == "" || k.Initrd == "" || k.Vmlinux != "" {
		t.Errorf("vmlinux gone: %+v %v", k, err)
	}

	// Nothing built: each missing asset is named.
	k, err = FindProgramKernel(t.TempDir(), ProgramKernel{Vmlinux: "/v"})
	if err == nil || !strings.Contains(err.Error(), "kernel.bzimage") || !strings.Contains(err.Error(), "initramfs") || k.Vmlinux != "/v" {
		t.Errorf("nothing built: %+v %v", k, err)
	}

	// A manifest that is not JSON.
	bad := t.TempDir()
	os.WriteFile(filepath.Join(bad, manifestFile), []byte("{"), 0o644)
	if _, err := FindProgramKernel(bad, ProgramKernel{}); err == nil || !strings.Contains(err.Error(), "manifest") {
		t.Errorf("bad manifest: %v", err)
	}
}
