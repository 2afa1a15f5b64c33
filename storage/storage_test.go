package storage

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
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
	base := Image{Path: parent, Format: FormatRaw}
	if err := (Disks{}).CreateOverlay(ctx, base, disk, 32); !errors.Is(err, ErrTooSmall) {
		t.Errorf("smaller than parent: %v", err)
	}
	if err := (Disks{}).CreateOverlay(ctx, base, disk, 10<<10); err != nil {
		t.Fatal(err)
	}
	info, err := Inspect(ctx, Image{Path: disk, Format: FormatQCOW2})
	if err != nil || info.VirtualSize != 10<<30 || info.BackingFile != parent || info.BackingFormat != "raw" {
		t.Fatalf("%+v %v", info, err)
	}
	if st, _ := os.Stat(disk); st.Size() > 1<<20 {
		t.Errorf("layer takes %d bytes: a copy?", st.Size())
	}
	// The chain as the images themselves declare it: the layer, then its
	// raw parent, and nothing under it.
	if got := backingChain(t, disk); !slices.Equal(got, []Image{{disk, FormatQCOW2}, {parent, FormatRaw}}) {
		t.Errorf("chain %v", got)
	}
	// Again, larger: kept and grown, never replaced.
	if err := (Disks{}).CreateOverlay(ctx, base, disk, 20<<10); err != nil {
		t.Fatal(err)
	}
	if info, _ := Inspect(ctx, Image{Path: disk, Format: FormatQCOW2}); info.VirtualSize != 20<<30 {
		t.Errorf("not grown: %+v", info)
	}
	other := filepath.Join(dir, "other.raw")
	os.WriteFile(other, make([]byte, 1<<20), 0o600)
	if err := (Disks{}).CreateOverlay(ctx, Image{Path: other, Format: FormatRaw}, disk, 20<<10); err == nil {
		t.Error("replaced a disk that belongs to another parent")
	}
	// The same file named as another format is another parent too.
	if err := (Disks{}).CreateOverlay(ctx, Image{Path: parent, Format: FormatQCOW2}, disk, 20<<10); err == nil {
		t.Error("accepted a parent of another format")
	}
}

// backingChain is the chain of image as `qemu-img info --backing-chain`
// reads it.
func backingChain(t *testing.T, image string) []Image {
	t.Helper()
	out := testenv.Cmd(t, "qemu-img", "info", "--backing-chain", "--output=json", "-U", "-f", "qcow2", image)
	var infos []struct {
		Filename string `json:"filename"`
		Format   string `json:"format"`
	}
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		t.Fatal(err)
	}
	var chain []Image
	for _, i := range infos {
		chain = append(chain, Image{i.Filename, i.Format})
	}
	return chain
}

func TestVolume(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "e2fsck")
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "data.ext4")
	if err := (Disks{}).CreateVolume(ctx, path, 64, "data"); err != nil {
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
	if err := (Disks{}).CreateVolume(ctx, path, 64, "data"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "kept" {
		t.Error("an existing volume was recreated")
	}
}
