package backup

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
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

// convert copies d, as its chain reads now, into dst: a standalone
// compressed qcow2 (qemu-img convert -U -O qcow2 -c, as the reference,
// with compression's type). The VM keeps its disk open: -U shares it,
// and the caller has frozen or paused the guest.
func convert(ctx context.Context, d Disk, dst, compression string) error {
	args := []string{"convert", "-U", "--image-opts", imageOpts(d), "-O", storage.FormatQCOW2, "-c"}
	if compression == Zstd {
		args = append(args, "-o", "compression_type=zstd")
	}
	_, err := run(ctx, "qemu-img", append(args, dst)...)
	if err != nil {
		return fmt.Errorf("copy %s: %w", d.Member, err)
	}
	return nil
}

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

// member is one file of a backup's tar.
type member struct {
	name string
	path string
}

// writeTar writes members into a new tar at path, in order, and returns
// its sha256, computed as it is written.
func writeTar(path string, members []member) (string, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(f, h))
	err = func() error {
		for _, m := range members {
			src, err := os.Open(m.path)
			if err != nil {
				return err
			}
			st, err := src.Stat()
			if err == nil {
				err = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: m.name, Mode: 0o644, Size: st.Size(), ModTime: st.ModTime()})
			}
			if err == nil {
				_, err = io.CopyBuffer(tw, src, make([]byte, 1<<20))
			}
			src.Close()
			if err != nil {
				return fmt.Errorf("archive %s: %w", m.name, err)
			}
		}
		return tw.Close()
	}()
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
