package storage

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func TestOverlay(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	ctx := context.Background()
	dir := t.TempDir()
	parent := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(parent, make([]byte, 64<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "rootfs.qcow2")
	if err := CreateOverlay(ctx, parent, disk, 32); !errors.Is(err, ErrTooSmall) {
		t.Errorf("smaller than parent: %v", err)
	}
	if err := CreateOverlay(ctx, parent, disk, 10<<10); err != nil {
		t.Fatal(err)
	}
	info, err := Inspect(ctx, disk)
	if err != nil || info.Format != "qcow2" || info.VirtualSize != 10<<30 || info.BackingFormat != "raw" {
		t.Fatalf("%+v %v", info, err)
	}
	if st, _ := os.Stat(disk); st.Size() > 1<<20 {
		t.Errorf("layer takes %d bytes: a copy?", st.Size())
	}
	// Again, larger: kept and grown, never replaced.
	if err := CreateOverlay(ctx, parent, disk, 20<<10); err != nil {
		t.Fatal(err)
	}
	if info, _ := Inspect(ctx, disk); info.VirtualSize != 20<<30 {
		t.Errorf("not grown: %+v", info)
	}
	other := filepath.Join(dir, "other.raw")
	os.WriteFile(other, make([]byte, 1<<20), 0o600)
	if err := CreateOverlay(ctx, other, disk, 20<<10); err == nil {
		t.Error("replaced a disk that belongs to another parent")
	}
}

func TestVolume(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "e2fsck")
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "data.ext4")
	if err := CreateVolume(ctx, path, 64, "data"); err != nil {
		t.Fatal(err)
	}
	testenv.Cmd(t, "e2fsck", "-fn", path)
	st, _ := os.Stat(path)
	if st.Size() != 64<<20 {
		t.Errorf("size %d", st.Size())
	}
	if err := os.WriteFile(path, []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := CreateVolume(ctx, path, 64, "data"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "kept" {
		t.Error("an existing volume was recreated")
	}
}
