package instance

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/storage"
)

// bootHead is how much of a disk bootForm reads: the MBR, the GPT header
// and, where partitioning tools put it, the GPT partition array.
const bootHead = 1 << 20

// bootForm reads the start of the disk the guest will see from chain, a
// base image and the layers under it, top first (through qemu-img for a
// qcow2), and says how it boots; it returns what it read too. A bare ext4
// filesystem must be stored raw, as the bottom of the chain: layers over
// it are qcow2.
func bootForm(ctx context.Context, chain []storage.Image, scratch string) (baseForm, []byte, error) {
	head, err := readHead(ctx, chain, scratch)
	if err != nil {
		return "", nil, err
	}
	form, err := classifyBoot(head)
	if bottom := chain[len(chain)-1]; err == nil && form == formExt4 && bottom.Format != storage.FormatRaw {
		err = fmt.Errorf("base image: a %s image holding a bare ext4 filesystem: store the filesystem raw", bottom.Format)
	}
	if err != nil {
		// What the image is, not a failure of the node's.
		return "", nil, &execution.Error{Status: 400, Msg: err.Error(), Err: err}
	}
	return form, head, nil
}

func readHead(ctx context.Context, chain []storage.Image, scratch string) ([]byte, error) {
	top := chain[0]
	path := top.Path
	if top.Format != storage.FormatRaw {
		// qemu-img dd reads what the guest would, whatever the clusters,
		// through the chain the node built, spelled out: it could not
		// follow the aleph:// names in the layers' headers, and must not
		// follow any other.
		tmp := filepath.Join(scratch, "boot-head.tmp")
		defer os.Remove(tmp)
		os.Remove(tmp)
		spec, err := chainJSON(chain)
		if err != nil {
			return nil, err
		}
		cmd := exec.CommandContext(ctx, "qemu-img", "dd", "-O", "raw", fmt.Sprintf("bs=%d", bootHead), "count=1", "if=json:"+spec, "of="+tmp)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("read the start of base image %s: %v: %s", top.Path, err, bytes.TrimSpace(out))
		}
		path = tmp
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	head := make([]byte, bootHead)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.ErrUnexpectedEOF {
		return nil, fmt.Errorf("read base image: %w", err)
	}
	return head[:n], nil
}

// chainJSON is QEMU's description of chain, top first, each image opened
// with its format and the last with no backing: a json: file name.
func chainJSON(chain []storage.Image) (string, error) {
	var node map[string]any
	for i := len(chain) - 1; i >= 0; i-- {
		img := chain[i]
		if img.Format != storage.FormatRaw && img.Format != storage.FormatQCOW2 {
			return "", fmt.Errorf("base image %s: format %q", img.Path, img.Format)
		}
		n := map[string]any{"driver": img.Format, "read-only": true,
			"file": map[string]any{"driver": "file", "filename": img.Path}}
		if img.Format == storage.FormatQCOW2 {
			n["backing"] = node // nil: JSON null, no backing
		} else if node != nil {
			return "", fmt.Errorf("base image %s: a raw image has nothing under it", img.Path)
		}
		node = n
	}
	b, err := json.Marshal(node)
	return string(b), err
}

// GPT partition type GUIDs, as stored (the first three fields little
// endian).
var (
	gptESP      = []byte{0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b}
	gptBIOSBoot = []byte("Hah!IdontNeedEFI")
)

// classifyBoot tells, from the first sectors of a disk, a bare ext4
// filesystem (booted with the node's kernel), a GPT disk with an EFI
// system partition (UEFI), and an MBR disk or a GPT disk with a BIOS boot
// partition, with boot code (the BIOS). Anything else is refused saying
// what was found.
func classifyBoot(head []byte) (baseForm, error) {
	if len(head) < 2048 {
		return "", fmt.Errorf("base image: %d bytes, too small to be a disk or a filesystem", len(head))
	}
	if head[1080] == 0x53 && head[1081] == 0xef {
		return formExt4, nil
	}
	bootCode := !isZero(head[:440])
	if string(head[512:520]) == "EFI PART" {
		esp, biosBoot := gptPartitions(head)
		switch {
		case esp:
			return formUEFI, nil
		case biosBoot && bootCode:
			return formDisk, nil
		case biosBoot:
			return "", fmt.Errorf("base image: a GPT disk with a BIOS boot partition but no boot code in its protective MBR: no bootloader installed")
		}
		return "", fmt.Errorf("base image: a GPT disk with neither an EFI system partition (for UEFI) nor a BIOS boot partition (for the BIOS): no bootloader")
	}
	if head[510] == 0x55 && head[511] == 0xaa {
		if !bootCode {
			return "", fmt.Errorf("base image: an MBR disk with no boot code: no bootloader installed")
		}
		return formDisk, nil
	}
	return "", fmt.Errorf("base image: neither a partitioned disk (MBR or GPT) nor an ext4 filesystem: unknown format")
}

// gptPartitions reads the GPT partition array in head (what of it head
// holds) for an EFI system partition and a BIOS boot partition.
func gptPartitions(head []byte) (esp, biosBoot bool) {
	for _, e := range gptEntries(head) {
		esp = esp || bytes.Equal(e[:16], gptESP)
		biosBoot = biosBoot || bytes.Equal(e[:16], gptBIOSBoot)
	}
	return esp, biosBoot
}

// gptEntries returns the entries of the GPT partition array in head (what
// of it head holds), 48 bytes or more each: type, GUID, first and last
// sector.
func gptEntries(head []byte) [][]byte {
	hdr := head[512:]
	start := binary.LittleEndian.Uint64(hdr[72:80]) * 512
	count := uint64(binary.LittleEndian.Uint32(hdr[80:84]))
	size := uint64(binary.LittleEndian.Uint32(hdr[84:88]))
	if size < 128 || count > 1024 {
		return nil
	}
	var entries [][]byte
	for i := range count {
		off := start + i*size
		if off+48 > uint64(len(head)) {
			break
		}
		entries = append(entries, head[off:off+48])
	}
	return entries
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
