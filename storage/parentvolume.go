package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// ErrParentFormat is a volume parent that is neither an ext4 filesystem
// nor a squashfs image.
var ErrParentFormat = errors.New("a volume's parent must be an ext4 filesystem or a squashfs image")

// ErrParentTooLarge is an ext4 parent larger than the volume made from it.
var ErrParentTooLarge = errors.New("the volume's parent is larger than the volume's size_mib")

// CreateVolumeFrom makes path a volume of sizeMiB that starts as a copy of
// parent: an ext4 parent is cloned (copy-on-write where the filesystem has
// reflinks, else a sparse copy) and its filesystem grown to the size; a
// squashfs parent's files are put in a new ext4 filesystem of the size. The
// volume is labelled label when it is set. An existing volume is kept: it
// holds what the VM wrote over its parent.
func (d Disks) CreateVolumeFrom(ctx context.Context, parent, path string, sizeMiB int64, label string) error {
	if _, err := os.Lstat(path); err == nil {
		return nil
	}
	format, parentSize, err := volumeParentFormat(parent)
	if err != nil {
		return err
	}
	size := sizeMiB << 20
	if format == "ext4" && parentSize > size {
		return fmt.Errorf("%w (%d MiB, volume %d MiB)", ErrParentTooLarge, (parentSize+1<<20-1)>>20, sizeMiB)
	}
	if err := d.reserve(filepath.Dir(path), "a volume", size); err != nil {
		return err
	}
	tmp := path + ".tmp"
	_ = os.RemoveAll(tmp)
	if format == "ext4" {
		err = cloneExt4(ctx, parent, tmp, size)
	} else {
		err = squashfsToExt4(ctx, parent, tmp, size)
	}
	if err == nil && label != "" {
		_, err = run(ctx, "e2label", tmp, label)
	}
	if err == nil {
		err = syncFile(tmp)
	}
	if err == nil {
		err = renameSynced(tmp, path)
	}
	if err != nil {
		_ = os.RemoveAll(tmp)
		return fmt.Errorf("create volume %s from %s: %w", path, parent, err)
	}
	return nil
}

// volumeParentFormat tells an ext4 filesystem from a squashfs image by
// their magic numbers, and gives the file's size.
func volumeParentFormat(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	head := make([]byte, 2048)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", 0, fmt.Errorf("read volume parent: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		return "", 0, err
	}
	switch {
	case n >= 4 && string(head[:4]) == "hsqs":
		return "squashfs", st.Size(), nil
	case n >= 1082 && head[1080] == 0x53 && head[1081] == 0xef:
		return "ext4", st.Size(), nil
	}
	return "", 0, ErrParentFormat
}

func cloneExt4(ctx context.Context, parent, dst string, size int64) error {
	if _, err := CloneFile(parent, dst); err != nil {
		return err
	}
	return growFile(ctx, dst, size)
}

// squashfsToExt4 unpacks parent and makes dst an ext4 filesystem of size
// holding its files, owners and modes.
func squashfsToExt4(ctx context.Context, parent, dst string, size int64) error {
	dir := dst + ".d.tmp"
	defer os.RemoveAll(dir)
	if _, err := run(ctx, "unsquashfs", "-no-progress", "-quiet", "-d", dir, parent); err != nil {
		return fmt.Errorf("unpack the squashfs parent: %w", err)
	}
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if _, err := run(ctx, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-m", "0", "-d", dir, dst); err != nil {
		return fmt.Errorf("make the volume from the squashfs parent's files: %w", err)
	}
	return nil
}
