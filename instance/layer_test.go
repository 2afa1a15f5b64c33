package instance

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// TestMakeLayer: a layer holds the root disk's writes and names the
// instance's parent by item hash, with its format; read through the chain
// the node builds, it shows the writes over the base. A restored root
// disk (standalone) is no layer.
func TestMakeLayer(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-io")
	ctx := context.Background()
	disks := t.TempDir()
	base := filepath.Join(disks, "base")
	if err := os.WriteFile(base, []byte(strings.Repeat("b", 1<<20)), 0o644); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(disks, rootDiskFile)
	if err := (storage.Disks{}).CreateOverlay(ctx, storage.Image{Path: base, Format: storage.FormatRaw}, root, 4); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 512", root).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	parent := message.ItemHash(strings.Repeat("d", 64))
	dst := filepath.Join(t.TempDir(), "layer.qcow2")
	if err := MakeLayer(ctx, LayerSource{Disks: disks, Parent: parent}, dst); err != nil {
		t.Fatal(err)
	}
	chain, err := storage.InspectChain(ctx, dst, func(context.Context, message.ItemHash) (string, error) { return base, nil }, 0)
	if err != nil {
		t.Fatal(err)
	}
	if chain[0].BackingFile != "aleph://"+string(parent) || chain[0].BackingFormat != "raw" || len(chain) != 2 {
		t.Fatalf("layer over %q (%s)", chain[0].BackingFile, chain[0].BackingFormat)
	}
	spec, _ := chainJSON(storage.Images(chain))
	head := filepath.Join(t.TempDir(), "head")
	if out, err := exec.Command("qemu-img", "dd", "-O", "raw", "bs=1024", "count=1", "if=json:"+spec, "of="+head).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	if b, _ := os.ReadFile(head); string(b) != strings.Repeat("a", 512)+strings.Repeat("b", 512) {
		t.Errorf("read through the layer: %.40q...", b)
	}

	os.Remove(root)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", root, "4M").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	if err := MakeLayer(ctx, LayerSource{Disks: disks, Parent: parent}, dst+"2"); err == nil || !strings.Contains(err.Error(), "restored from a backup") {
		t.Errorf("a restored root disk: %v", err)
	}
}
