package storage

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// CloneMethod says how CloneFile made its copy.
type CloneMethod string

// The ways CloneFile copies, from the cheapest.
const (
	// Reflink shares the source's extents (xfs, btrfs): instant, and only
	// the blocks written later take space.
	Reflink CloneMethod = "reflink"
	// FullCopy copies the bytes, keeping holes: slow, for filesystems
	// without reflinks.
	FullCopy CloneMethod = "copy"
)

// CloneFile makes dst a copy of src, by reflink where the filesystem
// supports it and by a sparse byte copy otherwise. dst must not exist; it
// is created only whole and durably (through a temporary name, synced
// before and after its rename).
func CloneFile(src, dst string) (CloneMethod, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", fmt.Errorf("clone %s: %w", src, err)
	}
	defer in.Close()
	if _, err := os.Lstat(dst); err == nil {
		return "", fmt.Errorf("clone %s to %s: %w", src, dst, os.ErrExist)
	}
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return "", fmt.Errorf("clone %s: %w", src, err)
	}
	method, err := cloneInto(out, in)
	if err := commitTemp(out, dst, err); err != nil {
		return "", fmt.Errorf("clone %s to %s: %w", src, dst, err)
	}
	return method, nil
}

func cloneInto(out, in *os.File) (CloneMethod, error) {
	err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd()))
	if err == nil {
		return Reflink, nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return "", err
	}
	return FullCopy, sparseCopy(out, in)
}

// sparseCopy copies in to out, seeking over holes so that a sparse image
// stays sparse.
func sparseCopy(out, in *os.File) error {
	st, err := in.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := io.CopyBuffer(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data), buf); err != nil {
			return err
		}
		off = hole
	}
	return out.Truncate(size)
}

// SupportsReflink reports whether files in dir can be cloned by reflink.
func SupportsReflink(dir string) (bool, error) {
	a, err := os.CreateTemp(dir, ".reflink-probe-")
	if err != nil {
		return false, err
	}
	defer os.Remove(a.Name())
	defer a.Close()
	if _, err := a.Write(make([]byte, 4096)); err != nil {
		return false, err
	}
	b, err := os.CreateTemp(dir, ".reflink-probe-")
	if err != nil {
		return false, err
	}
	defer os.Remove(b.Name())
	defer b.Close()
	return unix.IoctlFileClone(int(b.Fd()), int(a.Fd())) == nil, nil
}
