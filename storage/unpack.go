package storage

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Compression is how an image file is compressed, told by its content
// (never by its name).
type Compression string

const (
	NotCompressed Compression = ""
	Gzip          Compression = "gzip"
	XZ            Compression = "xz"
	Zstd          Compression = "zstd"
)

// ErrUnpackedTooLarge is a compressed image that expands past the limit
// its caller set: a decompression bomb, or an image larger than the disk
// made from it.
var ErrUnpackedTooLarge = errors.New("the image expands past the size allowed")

// DetectCompression reads the magic number at the start of path.
func DetectCompression(path string) (Compression, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, 6)
	n, _ := io.ReadFull(f, head)
	head = head[:n]
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}):
		return Gzip, nil
	case bytes.HasPrefix(head, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}):
		return XZ, nil
	case bytes.HasPrefix(head, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return Zstd, nil
	}
	return NotCompressed, nil
}

// Unpack writes the decompressed content of src, compressed as c, to dst:
// sparse (blocks of zeros are holes, as in the disk images it unpacks),
// through a temporary name, synced, and at most limit bytes (else
// ErrUnpackedTooLarge and nothing at dst). Each format checks its own
// checksums (gzip's CRC-32, xz's block checks, zstd's content checksum
// when the frame has one): a corrupt file is an error.
func Unpack(ctx context.Context, src string, c Compression, dst string, limit int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	var r io.Reader
	switch c {
	case Gzip:
		gz, err := gzip.NewReader(in)
		if err != nil {
			return fmt.Errorf("unpack %s: %w", src, err)
		}
		defer gz.Close()
		r = gz
	case XZ:
		if r, err = xz.NewReader(in); err != nil {
			return fmt.Errorf("unpack %s: %w", src, err)
		}
	case Zstd:
		zr, err := zstd.NewReader(in, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			return fmt.Errorf("unpack %s: %w", src, err)
		}
		defer zr.Close()
		r = zr
	default:
		return fmt.Errorf("unpack %s: not compressed", src)
	}
	// A name of its own: two VMs of one image may unpack it at once.
	out, err := os.CreateTemp(filepath.Dir(dst), filepath.Base(dst)+".*.tmp")
	if err != nil {
		return err
	}
	err = writeSparse(ctx, out, io.LimitReader(r, limit+1), limit)
	if err := commitTemp(out, dst, err); err != nil {
		return fmt.Errorf("unpack %s: %w", src, err)
	}
	return nil
}

// writeSparse copies r to out, seeking over blocks of zeros, and fails
// with ErrUnpackedTooLarge past limit bytes.
func writeSparse(ctx context.Context, out *os.File, r io.Reader, limit int64) error {
	const block = 64 << 10
	buf := make([]byte, block)
	var size int64
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := readBlock(r, buf)
		if n > 0 {
			size += int64(n)
			if size > limit {
				return fmt.Errorf("%w (%d bytes)", ErrUnpackedTooLarge, limit)
			}
			if isZero(buf[:n]) {
				if _, serr := out.Seek(int64(n), io.SeekCurrent); serr != nil {
					return serr
				}
			} else if _, werr := out.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return out.Truncate(size)
		}
		if err != nil {
			return err
		}
	}
}

// readBlock fills buf from r, returning io.EOF only at a clean end of r
// (a truncated stream is its decompressor's io.ErrUnexpectedEOF).
func readBlock(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// CollectUnpacked removes from dir (where images are unpacked) the
// temporary files of interrupted unpacks, and the unpacked images no VM
// links any more (one link: dir's own) that were made before cutoff.
// Call it while nothing unpacks there, as when the node starts.
func CollectUnpacked(dir string, cutoff time.Time) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() {
			continue
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		unused := ok && st.Nlink == 1 && info.ModTime().Before(cutoff)
		if !strings.HasSuffix(e.Name(), ".tmp") && !unused {
			continue
		}
		if err := os.Remove(path); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, path)
	}
	return removed, errors.Join(errs...)
}
