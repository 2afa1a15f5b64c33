package instance

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/storage"
)

// TestRestoredRootDisk: the root disk's chain as a backup reads it (the
// layer over the linked base, or a restored standalone disk), a restored
// disk used as it is and grown to the message's size, and a restore cut
// by a crash between its renames finished at the next start.
func TestRestoredRootDisk(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	ctx := context.Background()
	disks := t.TempDir()
	base := filepath.Join(disks, "base")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "raw", base, "16M").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	root := filepath.Join(disks, rootDiskFile)
	if err := (storage.Disks{}).CreateOverlay(ctx, storage.Image{Path: base, Format: storage.FormatRaw}, root, 32); err != nil {
		t.Fatal(err)
	}
	d, err := rootDiskChain(ctx, disks, 0)
	if err != nil || d.Member != "rootfs.qcow2" || len(d.Backing) != 1 || d.Backing[0].Path != base || d.Backing[0].Format != "raw" {
		t.Fatalf("layered chain: %+v %v", d, err)
	}
	m := &Manager{opts: Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))}}
	if _, ok, err := m.restoredRootDisk(ctx, root, 32); ok || err != nil {
		t.Fatalf("a layer taken for a restored disk: %v %v", ok, err)
	}

	// A restored disk: standalone, smaller than the message's size.
	os.Remove(root)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", root, "16M").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	if d, err := rootDiskChain(ctx, disks, 0); err != nil || len(d.Backing) != 0 {
		t.Fatalf("standalone chain: %+v %v", d, err)
	}
	drive, ok, err := m.restoredRootDisk(ctx, root, 32)
	if err != nil || !ok || drive.Path != root || drive.Format != "qcow2" || len(drive.Backing) != 0 {
		t.Fatalf("restored disk: %+v %v %v", drive, ok, err)
	}
	if info, err := storage.Inspect(ctx, storage.Image{Path: root, Format: storage.FormatQCOW2}); err != nil || info.VirtualSize != 32<<20 {
		t.Fatalf("not grown: %+v %v", info, err)
	}

	// A layer that names another backing file is refused.
	os.Remove(root)
	exec.Command("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", root, "16M").Run()
	if _, err := rootDiskChain(ctx, disks, 0); err == nil {
		t.Fatal("a root disk over /etc/shadow is backed up")
	}

	// Crashes between the renames.
	log := m.opts.Log
	os.Remove(root)
	os.WriteFile(filepath.Join(disks, restoreStaging), []byte("restored"), 0o600)
	os.WriteFile(filepath.Join(disks, preRestore+"20261203T104258Z.qcow2"), []byte("previous"), 0o600)
	if err := recoverRestore(disks, log); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(root); string(b) != "restored" {
		t.Fatalf("after a crash with the staged disk: %q", b)
	}
	os.Remove(root)
	if err := recoverRestore(disks, log); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(root); string(b) != "previous" {
		t.Fatalf("after a crash without the staged disk: %q", b)
	}
	if err := recoverRestore(disks, log); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(root); string(b) != "previous" {
		t.Fatalf("a disk in place is replaced: %q", b)
	}
}

// TestRootDiskChainOverLayers: a backup reads the root disk through the
// layers linked among the instance's disks, and through nothing else.
func TestRootDiskChainOverLayers(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	ctx := context.Background()
	disks := t.TempDir()
	hash := strings.Repeat("c", 64)
	lower := filepath.Join(disks, layerPrefix+hash)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "raw", lower, "16M").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	base := filepath.Join(disks, "base")
	if out, err := exec.Command("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", storage.LayerScheme+hash, base, "16M").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	root := filepath.Join(disks, rootDiskFile)
	if err := (storage.Disks{}).CreateOverlay(ctx, storage.Image{Path: base, Format: storage.FormatQCOW2}, root, 32); err != nil {
		t.Fatal(err)
	}
	d, err := rootDiskChain(ctx, disks, 0)
	want := []hypervisor.Layer{{Path: base, Format: "qcow2"}, {Path: lower, Format: "raw"}}
	if err != nil || !slices.Equal(d.Backing, want) {
		t.Fatalf("chain %+v %v, want %v", d.Backing, err, want)
	}
	os.Remove(lower)
	if _, err := rootDiskChain(ctx, disks, 0); err == nil || !strings.Contains(err.Error(), "not among the instance's disks") {
		t.Fatalf("a layer not linked: %v", err)
	}
}
