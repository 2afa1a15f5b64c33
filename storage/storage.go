// Package storage makes the disks VMs write to: an instance's root disk
// over its base image (a qcow2 layer for QEMU; for Firecracker, which reads
// raw disks only, a device-mapper snapshot or a reflink, a full copy only
// as the last resort), and the raw ext4 volumes of programs and instances.
//
// It decides what an image is and refuses those that reach past their own
// bytes (InspectParent): a base image is raw, or a qcow2 with no backing
// file, data file or encryption of its own, and its format, decided once,
// is named wherever it is opened. A layer may name its parent only by
// item hash (aleph://, InspectChain): the node resolves it and builds the
// chain itself. It refuses a disk its filesystem cannot
// hold (Disks), makes every disk durably (synced before and after its
// rename), and gives every volume name its own file (VolumeFileName).
package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrTooSmall is returned when a disk would be smaller than its base.
var ErrTooSmall = errors.New("disk smaller than its base image")

// CreateOverlay makes path a qcow2 layer of sizeMiB over parent: reads
// fall through to the parent, writes stay in the layer, and creating it
// costs the same whatever the size. The parent must stand alone
// (ImageInfo.Standalone), or be a layer naming its own parent by item
// hash (InspectChain, which the caller ran on the whole chain): the
// layer's backing file is the only path named in the chain, and it is
// named with its format. An existing layer over
// the same parent is kept as it is (the instance's data lives there), and
// grown if asked, so the call is idempotent. A size below the parent's is
// refused, as is one the filesystem cannot hold.
func (d Disks) CreateOverlay(ctx context.Context, parent Image, path string, sizeMiB int64) error {
	parentAbs, err := filepath.Abs(parent.Path)
	if err != nil {
		return err
	}
	parent.Path = parentAbs
	pinfo, err := Inspect(ctx, parent)
	if err != nil {
		return err
	}
	layered := pinfo.BackingFile != ""
	if layered {
		if _, err := pinfo.layerParent(); err != nil {
			return err
		}
	} else if err := pinfo.Standalone(); err != nil {
		return err
	}
	size := sizeMiB << 20
	if size < pinfo.VirtualSize {
		return fmt.Errorf("%w: %d MiB asked, the base image %s is %d MiB", ErrTooSmall, sizeMiB, parent.Path, pinfo.VirtualSize>>20)
	}
	if _, err := os.Lstat(path); err == nil {
		info, err := Inspect(ctx, Image{Path: path, Format: FormatQCOW2})
		if err != nil {
			return fmt.Errorf("disk %s: %w", path, err)
		}
		if info.BackingFile != parent.Path || info.BackingFormat != parent.Format || info.DataFile || info.Encrypted {
			return fmt.Errorf("disk %s exists and is not a layer over %s (it is over %s, %s): refusing to replace it",
				path, parent.Path, quote(info.BackingFile), quote(info.BackingFormat))
		}
		if info.VirtualSize < size {
			return d.grow(ctx, path, size-info.VirtualSize, size)
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("disk %s: %w", path, err)
	}
	if err := d.reserve(filepath.Dir(path), "a disk", size); err != nil {
		return err
	}
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	args := []string{"create", "-q", "-f", FormatQCOW2, "-o", "cluster_size=65536,lazy_refcounts=on"}
	if layered {
		// qemu-img would open the parent's chain, which only the node
		// can build.
		args = append(args, "-u")
	}
	_, err = run(ctx, "qemu-img", append(args, "-F", parent.Format, "-b", parent.Path, tmp, strconv.FormatInt(size, 10))...)
	if err == nil {
		err = syncFile(tmp)
	}
	if err == nil {
		err = renameSynced(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("create disk %s over %s: %w", path, parent.Path, err)
	}
	return nil
}

// Grow grows the qcow2 disk at path to size bytes, unless the
// filesystem cannot hold the growth.
func (d Disks) Grow(ctx context.Context, path string, size int64) error {
	info, err := Inspect(ctx, Image{Path: path, Format: FormatQCOW2})
	if err != nil {
		return fmt.Errorf("disk %s: %w", path, err)
	}
	if info.VirtualSize >= size {
		return nil
	}
	return d.grow(ctx, path, size-info.VirtualSize, size)
}

func (d Disks) grow(ctx context.Context, path string, by, size int64) error {
	if err := d.reserve(filepath.Dir(path), "the growth of a disk", by); err != nil {
		return err
	}
	if _, err := run(ctx, "qemu-img", "resize", "-q", "-f", FormatQCOW2, path, strconv.FormatInt(size, 10)); err != nil {
		return fmt.Errorf("grow disk %s: %w", path, err)
	}
	return nil
}

// CreateVolume makes path a sparse raw disk of sizeMiB holding an empty
// ext4 filesystem labelled label, unless the filesystem cannot hold it.
// An existing volume is kept (persistent volumes outlive their VM); use
// os.Remove first for an ephemeral one.
func (d Disks) CreateVolume(ctx context.Context, path string, sizeMiB int64, label string) error {
	if _, err := os.Lstat(path); err == nil {
		return nil
	}
	if err := d.reserve(filepath.Dir(path), "a volume", sizeMiB<<20); err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("create volume %s: %w", path, err)
	}
	err = f.Truncate(sizeMiB << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		args := []string{"-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-m", "0"}
		if label != "" {
			args = append(args, "-L", label)
		}
		_, err = run(ctx, "mkfs.ext4", append(args, tmp)...)
	}
	if err == nil {
		err = syncFile(tmp)
	}
	if err == nil {
		err = renameSynced(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("create volume %s: %w", path, err)
	}
	return nil
}

func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
