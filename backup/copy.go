package backup

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/storage"
)

// Disk is one disk of a VM a backup copies.
type Disk struct {
	// Member is its name in the backup's tar: rootfs.qcow2 for the root
	// disk, <file stem>.qcow2 for a volume, as the reference names them.
	Member string
	Image  storage.Image
	// Backing is the chain under a qcow2 disk, nearest first, as the VM
	// opens it: the copy reads exactly these files, never a name written
	// in an image's header.
	Backing []hypervisor.Layer
}

// imageOpts describes d for qemu-img's --image-opts: each layer opened
// with its format and the next as its backing, the last with none.
func imageOpts(d Disk) string {
	layers := append([]hypervisor.Layer{{Path: d.Image.Path, Format: d.Image.Format}}, d.Backing...)
	var b strings.Builder
	prefix := ""
	for i, l := range layers {
		if i > 0 {
			b.WriteByte(',')
		}
		format := l.Format
		if format == "" {
			format = storage.FormatRaw
		}
		fmt.Fprintf(&b, "%sdriver=%s,%sfile.driver=file,%sfile.filename=%s", prefix, format, prefix, prefix, optEscape(l.Path))
		if format == storage.FormatQCOW2 && i == len(layers)-1 {
			// An empty backing opens none, whatever the header names.
			fmt.Fprintf(&b, ",%sbacking=", prefix)
		}
		prefix += "backing."
	}
	return b.String()
}

// optEscape escapes a value for QEMU's option syntax, where a comma is
// doubled.
func optEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// The compressions of a backup's qcow2 clusters.
const (
	// Zlib is the reference's (qemu-img convert -c), read by every QEMU.
	Zlib = "zlib"
	// Zstd compresses as well about nine times faster; QEMU reads it
	// since 5.1 (2020).
	Zstd = "zstd"
)

// check runs qemu-img check on a qcow2 the node made or received. Its
// header must have been read first (storage.Inspect): qemu-img opens
// what a header names.
func check(ctx context.Context, path string) error {
	_, err := run(ctx, "qemu-img", "check", "-q", "-f", storage.FormatQCOW2, path)
	return err
}

func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(string(out))
		}
		return out, fmt.Errorf("%s: %w: %s", name, err, msg)
	}
	return out, nil
}
