// Package storage makes the disks VMs write to: an instance's root disk
// over its base image (a qcow2 layer for QEMU; for Firecracker, which reads
// raw disks only, a device-mapper snapshot or a reflink, a full copy only
// as the last resort), and the raw ext4 volumes of programs and instances.
package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// ImageInfo is what qemu-img says of an image.
type ImageInfo struct {
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	BackingFilename string `json:"backing-filename"`
	BackingFormat   string `json:"backing-filename-format"`
}

// Inspect reads an image's format and virtual size.
func Inspect(ctx context.Context, path string) (ImageInfo, error) {
	out, err := run(ctx, "qemu-img", "info", "--output=json", "-U", path)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("inspect image %s: %w", path, err)
	}
	var info ImageInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return ImageInfo{}, fmt.Errorf("inspect image %s: %w", path, err)
	}
	return info, nil
}

// ErrTooSmall is returned when a disk would be smaller than its base.
var ErrTooSmall = errors.New("disk smaller than its base image")

// CreateOverlay makes path a qcow2 layer of sizeMiB over parent (raw or
// qcow2): reads fall through to the parent, writes stay in the layer, and
// creating it costs the same whatever the size. An existing layer over the
// same parent is kept as it is (the instance's data lives there), so the
// call is idempotent. A size below the parent's is refused.
func CreateOverlay(ctx context.Context, parent, path string, sizeMiB int64) error {
	parentAbs, err := filepath.Abs(parent)
	if err != nil {
		return err
	}
	pinfo, err := Inspect(ctx, parentAbs)
	if err != nil {
		return err
	}
	size := sizeMiB << 20
	if size < pinfo.VirtualSize {
		return fmt.Errorf("%w: %d MiB asked, the base image %s is %d MiB", ErrTooSmall, sizeMiB, parent, pinfo.VirtualSize>>20)
	}
	if info, err := Inspect(ctx, path); err == nil {
		if info.Format == "qcow2" && info.BackingFilename == parentAbs {
			if info.VirtualSize < size {
				if _, err := run(ctx, "qemu-img", "resize", path, strconv.FormatInt(size, 10)); err != nil {
					return fmt.Errorf("grow disk %s: %w", path, err)
				}
			}
			return nil
		}
		return fmt.Errorf("disk %s exists and is not a layer over %s (it is %s over %q): refusing to replace it", path, parent, info.Format, info.BackingFilename)
	}
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	if _, err := run(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,lazy_refcounts=on",
		"-F", pinfo.Format, "-b", parentAbs, tmp, strconv.FormatInt(size, 10)); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("create disk %s over %s: %w", path, parent, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("create disk %s: %w", path, err)
	}
	return nil
}

// CreateVolume makes path a sparse raw disk of sizeMiB holding an empty
// ext4 filesystem labelled label. An existing volume is kept (persistent
// volumes outlive their VM); use os.Remove first for an ephemeral one.
func CreateVolume(ctx context.Context, path string, sizeMiB int64, label string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
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
		err = os.Rename(tmp, path)
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
