package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// baseImage makes a 64 MiB ext4 image holding /hello, as an instance's
// base image is.
func baseImage(t testing.TB, dir string) string {
	t.Helper()
	testenv.RequireTools(t, "mkfs.ext4", "e2fsck", "resize2fs", "debugfs", "dumpe2fs")
	content := filepath.Join(dir, "content")
	os.Mkdir(content, 0o755)
	os.WriteFile(filepath.Join(content, "hello"), []byte("hello from the base\n"), 0o644)
	img := filepath.Join(dir, "base.ext4")
	testenv.Cmd(t, "mkfs.ext4", "-q", "-d", content, img, "64M")
	return img
}

// fsSize reads the size of the ext4 filesystem on dev from its superblock.
func fsSize(t *testing.T, dev string) int64 {
	t.Helper()
	var blocks, blockSize int64
	for line := range strings.Lines(testenv.Cmd(t, "dumpe2fs", "-h", dev)) {
		fields := strings.Split(line, ":")
		if len(fields) != 2 {
			continue
		}
		var n int64
		if _, err := fmt.Sscan(strings.TrimSpace(fields[1]), &n); err != nil {
			continue
		}
		switch fields[0] {
		case "Block count":
			blocks = n
		case "Block size":
			blockSize = n
		}
	}
	return blocks * blockSize
}

// checkRawDisk checks that disk holds the base's file in a clean
// filesystem of sizeMiB.
func checkRawDisk(t *testing.T, disk RawDisk, sizeMiB int64) {
	t.Helper()
	testenv.Cmd(t, "e2fsck", "-fn", disk.Path)
	if got := fsSize(t, disk.Path); got != sizeMiB<<20 {
		t.Errorf("filesystem of %d MiB, want %d", got>>20, sizeMiB)
	}
	if got := testenv.Cmd(t, "debugfs", "-R", "cat /hello", disk.Path); !strings.Contains(got, "hello from the base") {
		t.Errorf("/hello reads %q", got)
	}
}

func captureLog() (*slog.Logger, *bytes.Buffer) {
	var buf bytes.Buffer
	return slog.New(slog.NewTextHandler(&buf, nil)), &buf
}

// TestRawDiskReflink makes an instance's raw disk on a loop-mounted xfs:
// a reflink of the base, grown with its filesystem, kept with its data on
// the next start and grown again when the size grows.
func TestRawDiskReflink(t *testing.T) {
	mnt := mountXFS(t)
	if ok, _ := HasDeviceMapper(); ok {
		t.Skip("device-mapper is here, so raw disks are snapshots: see TestRawDiskDeviceMapper")
	}
	testenv.RequireTools(t, "filefrag")
	ctx := context.Background()
	parent := baseImage(t, mnt)
	dir := filepath.Join(mnt, "inst")
	os.Mkdir(dir, 0o700)
	log, logged := captureLog()

	if _, err := (Disks{}).CreateRawDisk(ctx, parent, dir, "inst", 32, log); !errors.Is(err, ErrTooSmall) {
		t.Errorf("smaller than the base: %v", err)
	}
	disk, err := Disks{}.CreateRawDisk(ctx, parent, dir, "inst", 256, log)
	if err != nil {
		t.Fatal(err)
	}
	if disk.Method != ReflinkCopy || disk.Path != filepath.Join(dir, "rootfs.raw") {
		t.Errorf("disk %+v", disk)
	}
	checkRawDisk(t, disk, 256)
	if out := testenv.Cmd(t, "filefrag", "-v", disk.Path); !strings.Contains(out, "shared") {
		t.Errorf("the disk shares no extent with its base:\n%s", out)
	}
	if logged.Len() > 0 {
		t.Errorf("logged: %s", logged)
	}

	// The instance writes; the next start keeps that and grows.
	testenv.Cmd(t, "debugfs", "-w", "-R", "mkdir kept", disk.Path)
	again, err := Disks{}.CreateRawDisk(ctx, parent, dir, "inst", 384, log)
	if err != nil {
		t.Fatal(err)
	}
	checkRawDisk(t, again, 384)
	if out := testenv.Cmd(t, "debugfs", "-R", "ls /", again.Path); !strings.Contains(out, "kept") {
		t.Errorf("the instance's write was lost:\n%s", out)
	}
}

// TestRawDiskCopy is the last resort, on a filesystem without reflinks.
func TestRawDiskCopy(t *testing.T) {
	dir := t.TempDir()
	if ok, _ := SupportsReflink(dir); ok {
		t.Skip("the temporary directory supports reflinks; the copy cannot be seen here")
	}
	if ok, _ := HasDeviceMapper(); ok {
		t.Skip("device-mapper is here, so raw disks are snapshots")
	}
	parent := baseImage(t, dir)
	log, logged := captureLog()
	disk, err := Disks{}.CreateRawDisk(context.Background(), parent, dir, "inst", 128, log)
	if err != nil {
		t.Fatal(err)
	}
	if disk.Method != PlainCopy {
		t.Errorf("method %s", disk.Method)
	}
	checkRawDisk(t, disk, 128)
	if !strings.Contains(logged.String(), "level=WARN") || !strings.Contains(logged.String(), "full copy") {
		t.Errorf("no warning: %q", logged)
	}
	if method, why := RawDiskMethodFor(dir); method != PlainCopy || !strings.Contains(why, "does not support reflinks") {
		t.Errorf("method for %s: %s (%s)", dir, method, why)
	}
}

func TestRawDiskRefusesNonExt4(t *testing.T) {
	dir := t.TempDir()
	parent := filepath.Join(dir, "disk.img")
	os.WriteFile(parent, make([]byte, 4<<20), 0o600)
	if _, err := (Disks{}).CreateRawDisk(context.Background(), parent, dir, "x", 8, slog.Default()); err == nil || !strings.Contains(err.Error(), "not a bare ext4") {
		t.Errorf("a base with no ext4 superblock: %v", err)
	}
}

// TestRawDiskDeviceMapper runs only where the kernel has device-mapper
// (this machine's does not).
func TestRawDiskDeviceMapper(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	if ok, why := HasDeviceMapper(); !ok {
		t.Skip("no device-mapper snapshot can be made here: " + why)
	}
	ctx := context.Background()
	dir := t.TempDir()
	parent := baseImage(t, dir)
	disk, err := Disks{}.CreateRawDisk(ctx, parent, dir, "alephvm-test", 256, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { disk.Release(context.Background()) })
	if disk.Method != DeviceMapper || !strings.HasPrefix(disk.Path, "/dev/mapper/") {
		t.Fatalf("disk %+v", disk)
	}
	checkRawDisk(t, disk, 256)
	testenv.Cmd(t, "debugfs", "-w", "-R", "mkdir kept", disk.Path)
	if err := disk.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(disk.Path); err == nil {
		t.Error("device left after release")
	}
	again, err := Disks{}.CreateRawDisk(ctx, parent, dir, "alephvm-test", 384, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	checkRawDisk(t, again, 384)
	if out := testenv.Cmd(t, "debugfs", "-R", "ls /", again.Path); !strings.Contains(out, "kept") {
		t.Errorf("the snapshot lost the instance's write:\n%s", out)
	}
	if got := testenv.Cmd(t, "debugfs", "-R", "cat /hello", parent); !strings.Contains(got, "hello from the base") {
		t.Error("the base image changed")
	}
}

func TestLoopsIn(t *testing.T) {
	got := loopsIn(" 2 dependencies\t: (loop12) (dm-0)\n")
	if len(got) != 1 || got[0] != "loop12" {
		t.Errorf("got %v", got)
	}
}
