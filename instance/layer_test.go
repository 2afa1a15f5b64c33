package instance

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/internal/teststore"
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

	// Over a base that is itself a layer, which qemu-img cannot open.
	os.Remove(root)
	os.Remove(base)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", storage.LayerScheme+strings.Repeat("f", 64), base, "1M").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	if err := (storage.Disks{}).CreateOverlay(ctx, storage.Image{Path: base, Format: storage.FormatQCOW2}, root, 4); err != nil {
		t.Fatal(err)
	}
	if err := MakeLayer(ctx, LayerSource{Disks: disks, Parent: parent}, dst+"1"); err != nil {
		t.Fatalf("over a layer: %v", err)
	}
	if info, err := storage.Inspect(ctx, storage.Image{Path: dst + "1", Format: storage.FormatQCOW2}); err != nil || info.BackingFormat != storage.FormatQCOW2 {
		t.Errorf("layer over a layer: %+v %v", info, err)
	}

	os.Remove(root)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", root, "4M").CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	if err := MakeLayer(ctx, LayerSource{Disks: disks, Parent: parent}, dst+"2"); err == nil || !strings.Contains(err.Error(), "restored from a backup") {
		t.Errorf("a restored root disk: %v", err)
	}
}

// TestFindLayerSource: a layer is made of a stopped QEMU instance this
// node hosts, over the item its base was linked from; a running one, one
// under Firecracker and one the node does not host are refused.
func TestFindLayerSource(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, database := teststore.Open(t, dir)
	records := execution.NewRecords(database)
	volumes := filepath.Join(dir, "volumes")
	parent := message.ItemHash(strings.Repeat("e", 64))
	ref := func(c string) message.ItemHash { return message.ItemHash(strings.Repeat(c, 64)) }
	for i, state := range []execution.State{execution.StateStopped, execution.StateRunning, execution.StateStarting} {
		c := string(rune('1' + i))
		if err := records.Put(ctx, execution.Record{Ref: ref(c), Kind: execution.KindInstance, State: state, Hypervisor: hypervisor.QEMU, NetIndex: i}); err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Join(volumes, string(ref(c))), 0o700)
		os.WriteFile(filepath.Join(volumes, string(ref(c)), baseRefFile), []byte(parent+"\n"), 0o600)
	}
	if err := records.Put(ctx, execution.Record{Ref: ref("4"), Kind: execution.KindInstance, State: execution.StateStopped, Hypervisor: hypervisor.Firecracker, NetIndex: 3}); err != nil {
		t.Fatal(err)
	}

	src, err := FindLayerSource(ctx, records, st, volumes, ref("1"))
	if err != nil || src.Parent != parent || src.Disks != filepath.Join(volumes, string(ref("1"))) {
		t.Errorf("stopped instance: %+v %v", src, err)
	}
	for c, why := range map[string]string{"2": "running", "3": "running", "4": "firecracker", "5": "not hosted"} {
		if _, err := FindLayerSource(ctx, records, st, volumes, ref(c)); err == nil || !strings.Contains(err.Error(), why) {
			t.Errorf("instance %s: %v, want %q", c, err, why)
		}
	}
}
