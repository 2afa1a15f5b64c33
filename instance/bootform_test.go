package instance

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/storage"
)

// disk builds the first MiB of a disk: boot code or not, and an MBR, a
// GPT with the given partition types, or an ext4 superblock.
func disk(code bool, kind string, types ...[]byte) []byte {
	head := make([]byte, bootHead)
	if code {
		copy(head, []byte{0xfa, 0xf4, 0xeb, 0xfd})
	}
	switch kind {
	case "mbr":
		head[510], head[511] = 0x55, 0xaa
	case "gpt":
		head[510], head[511] = 0x55, 0xaa
		head[446+4] = 0xee // protective MBR
		copy(head[512:], "EFI PART")
		binary.LittleEndian.PutUint64(head[512+72:], 2)
		binary.LittleEndian.PutUint32(head[512+80:], 128)
		binary.LittleEndian.PutUint32(head[512+84:], 128)
		for i, typ := range types {
			copy(head[1024+i*128:], typ)
		}
	case "ext4":
		head[1080], head[1081] = 0x53, 0xef
	}
	return head
}

func TestClassifyBoot(t *testing.T) {
	linux := []byte("\xaf\x3d\xc6\x0f\x83\x84\x72\x47\x8e\x79\x3d\x69\xd8\x47\x7d\xe4")
	for _, tc := range []struct {
		name string
		head []byte
		want baseForm
		err  string
	}{
		{"ext4", disk(false, "ext4"), formExt4, ""},
		{"MBR with GRUB", disk(true, "mbr"), formDisk, ""},
		{"MBR without boot code", disk(false, "mbr"), "", "no boot code"},
		{"GPT with an ESP", disk(false, "gpt", linux, gptESP), formUEFI, ""},
		{"GPT with an ESP and a BIOS boot partition", disk(true, "gpt", gptBIOSBoot, gptESP, linux), formUEFI, ""},
		{"GPT with a BIOS boot partition", disk(true, "gpt", gptBIOSBoot, linux), formDisk, ""},
		{"GPT with a BIOS boot partition, no boot code", disk(false, "gpt", gptBIOSBoot, linux), "", "no boot code"},
		{"GPT with Linux partitions only", disk(true, "gpt", linux), "", "neither an EFI system partition"},
		{"zeros", make([]byte, bootHead), "", "unknown format"},
		{"too small", make([]byte, 1000), "", "too small"},
	} {
		form, err := classifyBoot(tc.head)
		if form != tc.want || (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%s: %q %v, want %q %q", tc.name, form, err, tc.want, tc.err)
		}
	}
}

// TestBootFormOfQCOW2 reads the disk a qcow2 holds, not its header.
func TestBootFormOfQCOW2(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	os.WriteFile(raw, disk(true, "gpt", gptBIOSBoot), 0o644)
	os.Truncate(raw, 8<<20)
	qcow := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.Command("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, qcow).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	form, _, err := bootForm(context.Background(), []storage.Image{{Path: qcow, Format: storage.FormatQCOW2}}, dir)
	if err != nil || form != formDisk {
		t.Errorf("%q %v", form, err)
	}
	os.WriteFile(raw, disk(false, "ext4"), 0o644)
	os.Remove(qcow)
	exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow).Run()
	_, _, err = bootForm(context.Background(), []storage.Image{{Path: qcow, Format: storage.FormatQCOW2}}, dir)
	var e *execution.Error
	if !errors.As(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), "store the filesystem raw") {
		t.Errorf("a qcow2 of a bare filesystem: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.tmp")); len(left) > 0 {
		t.Errorf("left: %v", left)
	}
}

// TestBootFormOfLayers reads through the chain the node gives, not the
// names in the layers' headers (aleph://, which qemu-img cannot open): an
// upper layer over a lower one over a raw ext4 base boots as ext4, and the
// head is the upper layer's where it wrote over it.
func TestBootFormOfLayers(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	os.WriteFile(raw, disk(false, "ext4"), 0o644)
	os.Truncate(raw, 8<<20)
	layer := func(name, format string) string {
		p := filepath.Join(dir, name)
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", format,
			"-b", "aleph://"+strings.Repeat("ab", 32), p, "8M").CombinedOutput(); err != nil {
			t.Fatal(err, string(out))
		}
		return p
	}
	lower := layer("lower.qcow2", "raw")
	upper := layer("upper.qcow2", "qcow2")
	chain := []storage.Image{{Path: upper, Format: "qcow2"}, {Path: lower, Format: "qcow2"}, {Path: raw, Format: "raw"}}
	if form, _, err := bootForm(context.Background(), chain, dir); err != nil || form != formExt4 {
		t.Errorf("ext4 under two layers: %q %v", form, err)
	}
	// The upper layer writes zeros over the filesystem's head.
	alone, _ := chainJSON(chain[:1])
	if out, err := exec.Command("qemu-io", "-c", "write -z 0 1M", "json:"+strings.Replace(alone, `"read-only":true`, `"read-only":false`, 1)).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	if _, _, err := bootForm(context.Background(), chain, dir); err == nil || !strings.Contains(err.Error(), "unknown format") {
		t.Errorf("zeros written over the filesystem by the upper layer: %v", err)
	}
}
