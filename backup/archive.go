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
	"time"

	"github.com/alephvm/alephvm/storage"
	"golang.org/x/sys/unix"
)

// archive is a backup's tar, written in place: each disk is converted by
// qemu-img straight into the tar, after room for its member header, which
// is written once the copy's size is known. The copies are never written
// twice, and the backup takes no more than its tar.
type archive struct {
	f       *os.File
	path    string
	end     int64 // where the next member starts, a multiple of 512
	members []archived
}

type archived struct {
	name       string
	off, size  int64 // the member's data in the tar
	sourceSize int64
}

// createArchive starts the tar at path.
func createArchive(path string) (*archive, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	return &archive{f: f, path: path}, nil
}

func (a *archive) close() { a.f.Close() }

// memberHeader is the tar header of a member of size bytes: GNU's format,
// whose size field holds any size in the 512-byte header, so that its
// length depends on the name alone.
func memberHeader(name string, size int64) ([]byte, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size,
		ModTime: time.Now().Truncate(time.Second), Format: tar.FormatGNU})
	return b.Bytes(), err
}

func align512(n int64) int64 { return (n + 511) &^ 511 }

// dataOpts opens a member's qcow2 inside the tar, as qemu-img's
// --image-opts; size bounds it (0: up to the end of the file).
func (a *archive) dataOpts(off, size int64) string {
	s := fmt.Sprintf("driver=qcow2,file.driver=raw,file.offset=%d,", off)
	if size > 0 {
		s += fmt.Sprintf("file.size=%d,", align512(size))
	}
	return s + "file.file.driver=file,file.file.filename=" + optEscape(a.path)
}

// add copies d into the tar as a compressed standalone qcow2 (qemu-img
// convert -U -c of its chain, as the reference copies it). The caller has
// frozen or paused the guest.
func (a *archive) add(ctx context.Context, d Disk, compression, scratch string) error {
	info, err := storage.Inspect(ctx, d.Image)
	if err != nil {
		return fmt.Errorf("size of %s: %w", d.Member, err)
	}
	header, err := memberHeader(d.Member, 0)
	if err != nil {
		return err
	}
	off := a.end + int64(len(header))
	// convert -n writes into an image that exists: an empty qcow2 of the
	// disk's size, placed where the member's data goes.
	args := []string{"create", "-q", "-f", storage.FormatQCOW2}
	if compression == Zstd {
		args = append(args, "-o", "compression_type=zstd")
	}
	if _, err := run(ctx, "qemu-img", append(args, scratch, fmt.Sprint(info.VirtualSize))...); err != nil {
		return err
	}
	empty, err := os.Open(scratch)
	if err == nil {
		_, err = io.Copy(io.NewOffsetWriter(a.f, off), empty)
		empty.Close()
	}
	os.Remove(scratch)
	if err != nil {
		return fmt.Errorf("archive %s: %w", d.Member, err)
	}
	if _, err := run(ctx, "qemu-img", "convert", "-U", "-n", "--image-opts", imageOpts(d),
		"--target-image-opts", a.dataOpts(off, 0), "-c"); err != nil {
		return fmt.Errorf("copy %s: %w", d.Member, err)
	}
	st, err := a.f.Stat()
	if err != nil {
		return err
	}
	size := st.Size() - off
	if header, err = memberHeader(d.Member, size); err != nil {
		return err
	}
	if _, err := a.f.WriteAt(header, a.end); err != nil {
		return err
	}
	a.end = align512(st.Size())
	if err := a.f.Truncate(a.end); err != nil {
		return err
	}
	var sourceSize int64
	if st, err := os.Stat(d.Image.Path); err == nil {
		sourceSize = st.Size()
	}
	a.members = append(a.members, archived{name: d.Member, off: off, size: size, sourceSize: sourceSize})
	return nil
}

// check runs qemu-img check on each member where it lies in the tar.
func (a *archive) check(ctx context.Context) error {
	for _, m := range a.members {
		if _, err := run(ctx, "qemu-img", "check", "-q", "--image-opts", a.dataOpts(m.off, m.size)); err != nil {
			return fmt.Errorf("check the copy of %s: %w", m.name, err)
		}
	}
	return nil
}

// finish ends the tar (two zero blocks), syncs it and returns its sha256.
func (a *archive) finish() (string, error) {
	if err := a.f.Truncate(a.end + 1024); err != nil {
		return "", err
	}
	// The disk writes the tar out while it is hashed; the sync then has
	// little left to wait for.
	_ = unix.SyncFileRange(int(a.f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	h := sha256.New()
	if _, err := io.CopyBuffer(h, io.NewSectionReader(a.f, 0, a.end+1024), make([]byte, 1<<20)); err != nil {
		return "", err
	}
	if err := a.f.Sync(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
