package storage

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// freeSpace is a filesystem with free bytes left, as Disks.Free sees it.
func freeSpace(free int64) func(string) (int64, error) {
	return func(string) (int64, error) { return free, nil }
}

func checkNoSpace(t *testing.T, err error, leftovers ...string) {
	t.Helper()
	var se *Error
	if !errors.Is(err, ErrNoSpace) || !errors.As(err, &se) || se.HTTPStatus() != 507 {
		t.Fatalf("not refused with a 507: %v", err)
	}
	if !strings.Contains(err.Error(), "not enough disk space") {
		t.Errorf("unclear refusal: %v", err)
	}
	for _, p := range leftovers {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s made despite the refusal", p)
		}
	}
}

// TestDisksRefuseWhatTheFilesystemCannotHold: a volume, a root disk (new
// or grown) and a raw disk are refused with 507 when their size and the
// floor do not fit in the free space, made when they do; an existing
// disk that does not grow needs no space.
func TestDisksRefuseWhatTheFilesystemCannotHold(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "mkfs.ext4", "e2fsck", "resize2fs")
	ctx := context.Background()
	dir := t.TempDir()
	tight := Disks{Free: freeSpace(100 << 20), Floor: 40 << 20} // 60 MiB usable

	vol := filepath.Join(dir, "vol.ext4")
	checkNoSpace(t, tight.CreateVolume(ctx, vol, 64, "v"), vol, vol+".tmp")
	if err := tight.CreateVolume(ctx, vol, 60, "v"); err != nil {
		t.Fatal(err)
	}
	if err := (Disks{Free: freeSpace(0)}).CreateVolume(ctx, vol, 60, "v"); err != nil {
		t.Errorf("an existing volume needed space: %v", err)
	}

	parent := filepath.Join(dir, "base.raw")
	os.WriteFile(parent, make([]byte, 8<<20), 0o600)
	base := Image{Path: parent, Format: FormatRaw}
	disk := filepath.Join(dir, "rootfs.qcow2")
	checkNoSpace(t, tight.CreateOverlay(ctx, base, disk, 64), disk, disk+".tmp")
	if err := tight.CreateOverlay(ctx, base, disk, 32); err != nil {
		t.Fatal(err)
	}
	// Growing by 32 MiB fits, by 64 does not; a refused growth keeps the size.
	checkNoSpace(t, tight.CreateOverlay(ctx, base, disk, 96))
	if info, _ := Inspect(ctx, Image{Path: disk, Format: FormatQCOW2}); info.VirtualSize != 32<<20 {
		t.Errorf("refused growth changed the disk: %+v", info)
	}
	if err := tight.CreateOverlay(ctx, base, disk, 64); err != nil {
		t.Fatal(err)
	}
	if err := (Disks{Free: freeSpace(0)}).CreateOverlay(ctx, base, disk, 64); err != nil {
		t.Errorf("a disk that does not grow needed space: %v", err)
	}

	// Raw disks (Firecracker): by copy here, unless the test filesystem
	// has reflinks, which cost nothing at first but as much once written.
	rawParent := baseImage(t, t.TempDir())
	rawDir := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	if ok, _ := HasDeviceMapper(); ok {
		t.Skip("device-mapper is here: raw disks are snapshots, see TestRawDiskDeviceMapper")
	}
	_, err := tight.CreateRawDisk(ctx, rawParent, rawDir, "inst", 128, log)
	checkNoSpace(t, err, filepath.Join(rawDir, rawFile))
	roomy := Disks{Free: freeSpace(1 << 30), Floor: 40 << 20}
	if _, err := roomy.CreateRawDisk(ctx, rawParent, rawDir, "inst", 128, log); err != nil {
		t.Fatal(err)
	}
	if _, err := (Disks{Free: freeSpace(0)}).CreateRawDisk(ctx, rawParent, rawDir, "inst", 128, log); err != nil {
		t.Errorf("a raw disk that does not grow needed space: %v", err)
	}
	_, err = tight.CreateRawDisk(ctx, rawParent, rawDir, "inst", 256, log)
	checkNoSpace(t, err)
}

func TestDisksFreeSpaceErrors(t *testing.T) {
	broken := errors.New("statfs broke")
	d := Disks{Free: func(string) (int64, error) { return 0, broken }}
	path := filepath.Join(t.TempDir(), "vol.ext4")
	if err := d.CreateVolume(context.Background(), path, 8, ""); !errors.Is(err, broken) {
		t.Errorf("%v", err)
	}
	if _, err := os.Lstat(path); err == nil {
		t.Error("volume made without knowing the free space")
	}
}

func TestStatfsFree(t *testing.T) {
	free, err := StatfsFree(t.TempDir())
	if err != nil || free <= 0 {
		t.Errorf("%d %v", free, err)
	}
	if _, err := StatfsFree(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("free space of a missing directory")
	}
}
