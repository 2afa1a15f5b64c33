package instance

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// TestLayersEndToEnd stacks two layers over the raw ext4 base image and
// boots the chain under QEMU: instance 1, over the base, writes a file and
// is stopped, and its layer is stored; instance 2, over that layer, sees
// the file, writes another, is stopped, and its layer (over layer 1) is
// stored; instance 3, over layer 2, boots through the whole chain, which
// the node resolved by item hash and linked among its disks, and shows
// both files.
func TestLayersEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots three Debian VMs under emulation: minutes")
	}
	r := newRig(t)
	base := testassets.BaseImage(t)
	key, pub := testenv.SSHKey(t)
	testenv.RequireTools(t, "ssh")
	m := r.manager()
	m.opts.DirectBoot = execution.Kernel{Kernel: base.Kernel, Vmlinux: base.Vmlinux, Initrd: base.Initrd, Cmdline: base.Cmdline}
	m.opts.StopTimeouts = hypervisor.StopTimeouts{Shutdown: 90 * time.Second, Quit: 10 * time.Second, Kill: 5 * time.Second}
	ctx := context.Background()
	const sizeMiB = 3072
	volumes := filepath.Join(r.dir, "volumes")

	// run starts instance ref, runs cmd in it over SSH and stops it.
	run := func(name string, ref message.ItemHash, cmd string) string {
		t.Helper()
		start := time.Now()
		if err := m.Start(ctx, ref); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		rec, _ := r.records.Get(ctx, ref)
		testenv.WaitSSH(t, key, rec.IPv4, 6*time.Minute)
		t.Logf("%s: allocation to SSH: %s", name, time.Since(start).Round(time.Second))
		out, err := testenv.SSH(key, rec.IPv4, cmd)
		if err != nil {
			t.Fatalf("%s: %v: %s", name, err, out)
		}
		if _, err := m.Stop(ctx, ref); err != nil {
			t.Fatalf("%s: stop: %v", name, err)
		}
		return out
	}
	// layerOf stores the layer of stopped instance ref, as
	// `alephvm image layer` does.
	layerOf := func(ref message.ItemHash) message.ItemHash {
		t.Helper()
		src, err := FindLayerSource(ctx, r.records, r.st, volumes, ref)
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(r.dir, "layer-of-"+string(ref)[:12]+".qcow2")
		if err := MakeLayer(ctx, src, dst); err != nil {
			t.Fatal(err)
		}
		added, err := r.st.AddFile(ctx, dst)
		if err != nil {
			t.Fatal(err)
		}
		return added.Ref
	}

	ref1 := r.messageFor(base.Ext4, hypervisor.QEMU, sizeMiB, pub)
	run("instance 1 over the base", ref1, "echo one > /root/layer1; sync")
	layer1 := layerOf(ref1)
	if err := m.Erase(ctx, ref1); err != nil {
		t.Fatal(err)
	}

	ref2 := r.instanceOver(layer1, sizeMiB, pub)
	if out := run("instance 2 over layer 1", ref2, "cat /root/layer1; echo two > /root/layer2; sync"); out != "one" {
		t.Fatalf("instance 2 over layer 1 reads /root/layer1 as %q", out)
	}
	layer2 := layerOf(ref2)
	if err := m.Erase(ctx, ref2); err != nil {
		t.Fatal(err)
	}

	ref3 := r.instanceOver(layer2, sizeMiB, pub)
	if out := run("instance 3 over layer 2 over layer 1", ref3, "cat /root/layer1 /root/layer2"); out != "one\ntwo" {
		t.Fatalf("instance 3 reads %q, want the files of both layers", out)
	}
	disks := filepath.Join(volumes, string(ref3))
	if _, err := os.Stat(filepath.Join(disks, layerPrefix+string(layer1))); err != nil {
		t.Errorf("layer 1 not linked among instance 3's disks: %v", err)
	}
	d, err := rootDiskChain(ctx, disks, 0)
	if err != nil || len(d.Backing) != 3 {
		t.Errorf("instance 3's root disk as a backup reads it: %+v %v", d, err)
	}
	info, err := storage.Inspect(ctx, storage.Image{Path: filepath.Join(disks, "base"), Format: storage.FormatQCOW2})
	if err != nil || info.BackingFile != storage.LayerBacking(layer1) || info.BackingFormat != storage.FormatQCOW2 {
		t.Errorf("layer 2 names %q (%s), want %s: %v", info.BackingFile, info.BackingFormat, storage.LayerBacking(layer1), err)
	}
	if err := m.Erase(ctx, ref3); err != nil {
		t.Fatal(err)
	}
}
