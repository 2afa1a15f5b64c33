package qemu

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
)

// TestDrivesOpenOnlyTheirChain boots QEMU with images whose headers name
// other files, and checks that it opens the chains the spec gives and
// nothing an image names: a layer whose header names a decoy is opened
// over the given base; a qcow2 given no backing opens none; a raw disk a
// guest wrote a qcow2 header into stays raw.
func TestDrivesOpenOnlyTheirChain(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	d := newTestDriver(t)
	spec := blankVM(t)
	dir := spec.Dir
	file := func(name string, size int64) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	base, decoy, secret := file("base.raw", 1<<20), file("decoy.raw", 1<<20), file("secret", 1<<20)
	overlay := filepath.Join(dir, "overlay.qcow2")
	testenv.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", decoy, overlay)
	alone := filepath.Join(dir, "alone.qcow2")
	testenv.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, alone)
	// A raw volume whose guest wrote a qcow2 header naming a host file.
	looksQCOW2 := filepath.Join(dir, "volume.raw")
	testenv.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, looksQCOW2)
	if err := os.Truncate(looksQCOW2, 1<<20); err != nil {
		t.Fatal(err)
	}
	spec.Drives = append(spec.Drives,
		hypervisor.Drive{Path: overlay, Format: "qcow2", Backing: []hypervisor.Layer{{Path: base, Format: "raw"}}},
		hypervisor.Drive{Path: alone, Format: "qcow2"},
		hypervisor.Drive{Path: looksQCOW2},
	)
	vm, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if (&VM{dir: spec.Dir, pid: vm.Pid()}).isOurs() {
			_ = syscall.Kill(vm.Pid(), syscall.SIGKILL)
		}
	})
	var images []string
	for _, f := range testenv.OpenFiles(t, vm.Pid()) {
		if filepath.Dir(f) == dir && filepath.Ext(f) != ".log" && filepath.Base(f) != PidFile {
			images = append(images, filepath.Base(f))
		}
	}
	slices.Sort(images)
	images = slices.Compact(images)
	want := []string{"alone.qcow2", "base.raw", "blank.img", "overlay.qcow2", "volume.raw"}
	if !slices.Equal(images, want) {
		t.Errorf("QEMU opened %v, want %v", images, want)
	}
}
