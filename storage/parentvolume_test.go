package storage

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func TestCreateVolumeFrom(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "mksquashfs", "unsquashfs", "debugfs", "e2label", "resize2fs")
	ctx := context.Background()
	dir := t.TempDir()
	files := filepath.Join(dir, "files")
	os.MkdirAll(filepath.Join(files, "sub"), 0o755)
	os.WriteFile(filepath.Join(files, "sub", "hello"), []byte("from the parent\n"), 0o644)
	big := make([]byte, 3<<20)
	for i := range big {
		big[i] = byte(i * 7919 >> 3)
	}
	os.WriteFile(filepath.Join(files, "big"), big, 0o644)

	ext4 := filepath.Join(dir, "parent.ext4")
	if out, err := exec.Command("truncate", "-s", "8M", ext4).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", files, ext4).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	sqfs := filepath.Join(dir, "parent.squashfs")
	if out, err := exec.Command("mksquashfs", files, sqfs, "-noappend", "-quiet", "-no-progress").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	for _, parent := range []string{ext4, sqfs} {
		t.Run(filepath.Ext(parent), func(t *testing.T) {
			vol := filepath.Join(t.TempDir(), "vol.ext4")
			if err := (Disks{}).CreateVolumeFrom(ctx, parent, vol, 32, "data"); err != nil {
				t.Fatal(err)
			}
			if st, _ := os.Stat(vol); st.Size() != 32<<20 {
				t.Errorf("size %d", st.Size())
			}
			out, err := exec.Command("debugfs", "-R", "cat /sub/hello", vol).Output()
			if err != nil || string(out) != "from the parent\n" {
				t.Errorf("the parent's file: %q %v", out, err)
			}
			if out, _ := exec.Command("e2label", vol).Output(); strings.TrimSpace(string(out)) != "data" {
				t.Errorf("label %q", out)
			}
			if out, err := exec.Command("e2fsck", "-fn", vol).CombinedOutput(); err != nil {
				t.Errorf("e2fsck: %v\n%s", err, out)
			}
			// What the VM wrote stays: an existing volume is kept.
			os.WriteFile(vol, []byte("written by the guest"), 0o600)
			if err := (Disks{}).CreateVolumeFrom(ctx, parent, vol, 32, "data"); err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(vol); string(b) != "written by the guest" {
				t.Error("an existing volume was made again")
			}
			if left, _ := filepath.Glob(filepath.Join(filepath.Dir(vol), "*.tmp")); len(left) != 0 {
				t.Errorf("left: %v", left)
			}
		})
	}

	garbage := filepath.Join(dir, "garbage")
	os.WriteFile(garbage, make([]byte, 4096), 0o644)
	if err := (Disks{}).CreateVolumeFrom(ctx, garbage, filepath.Join(dir, "v1"), 32, ""); !errors.Is(err, ErrParentFormat) {
		t.Errorf("a parent of zeros: %v", err)
	}
	if err := (Disks{}).CreateVolumeFrom(ctx, ext4, filepath.Join(dir, "v2"), 4, ""); !errors.Is(err, ErrParentTooLarge) {
		t.Errorf("a volume smaller than its parent: %v", err)
	}
	if err := (Disks{}).CreateVolumeFrom(ctx, sqfs, filepath.Join(dir, "v3"), 2, ""); err == nil {
		t.Error("a squashfs parent in a volume too small for its files was accepted")
	}
	for _, v := range []string{"v1", "v2", "v3"} {
		if _, err := os.Stat(filepath.Join(dir, v)); err == nil {
			t.Errorf("%s made by a failed call", v)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.tmp")); len(left) != 0 {
		t.Errorf("left: %v", left)
	}
}
