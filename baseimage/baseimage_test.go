package baseimage

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// TestLoadAddsVmlinux: an image built before images had a vmlinux gets
// one from its own kernel when loaded, and its manifest says so. It uses
// the image the VM tests build, where there is one.
func TestLoadAddsVmlinux(t *testing.T) {
	built, err := Load(filepath.Join(testenv.CachePath(), "base-image"))
	if err != nil {
		t.Skipf("no base image built in the test cache (the instance tests build it): %v", err)
	}
	dir := t.TempDir()
	old := built
	old.Vmlinux = ""
	for _, f := range []*string{&old.Ext4, &old.Kernel, &old.Initrd, &old.Disk} {
		link := filepath.Join(dir, filepath.Base(*f))
		if err := os.Symlink(*f, link); err != nil {
			t.Fatal(err)
		}
		*f = link
	}
	data, _ := json.Marshal(old)
	if err := os.WriteFile(filepath.Join(dir, ManifestName), data, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	elf, err := os.ReadFile(img.Vmlinux)
	if err != nil || !bytes.HasPrefix(elf, []byte("\x7fELF")) {
		t.Fatalf("vmlinux %s: %v", img.Vmlinux, err)
	}
	again, err := Load(dir)
	if err != nil || again.Vmlinux != img.Vmlinux {
		t.Errorf("manifest not updated: %+v %v", again, err)
	}
}
