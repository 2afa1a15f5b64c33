package storage

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

func compress(t *testing.T, c Compression, data []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	var w io.WriteCloser
	var err error
	switch c {
	case Gzip:
		w = gzip.NewWriter(&b)
	case XZ:
		w, err = xz.NewWriter(&b)
	case Zstd:
		w, err = zstd.NewWriter(&b)
	}
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestUnpack(t *testing.T) {
	ctx := context.Background()
	// A disk image: data, a long run of zeros, data, zeros at the end.
	img := make([]byte, 4<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 256 << 10 {
		img[i] = byte(rng.Uint32())
	}
	copy(img[3<<20:], img[:128<<10])
	for _, c := range []Compression{Gzip, XZ, Zstd} {
		t.Run(string(c), func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "image.compressed")
			packed := compress(t, c, img)
			os.WriteFile(src, packed, 0o644)
			if got, err := DetectCompression(src); err != nil || got != c {
				t.Fatalf("detected %q %v", got, err)
			}
			dst := filepath.Join(dir, "image.raw")
			if err := Unpack(ctx, src, c, dst, int64(len(img))); err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(dst)
			if !bytes.Equal(got, img) {
				t.Fatal("unpacked bytes differ")
			}
			var st syscall.Stat_t
			syscall.Stat(dst, &st)
			if allocated := st.Blocks * 512; allocated > 1<<20 {
				t.Errorf("not sparse: %d bytes allocated for %d with 384 KiB of data", allocated, len(img))
			}

			// Past the limit: refused, nothing left.
			bomb := filepath.Join(dir, "bomb")
			if err := Unpack(ctx, src, c, bomb, int64(len(img))-1); !errors.Is(err, ErrUnpackedTooLarge) {
				t.Errorf("past the limit: %v", err)
			}
			// Truncated and corrupted: refused.
			os.WriteFile(src, packed[:len(packed)/2], 0o644)
			if err := Unpack(ctx, src, c, filepath.Join(dir, "cut"), int64(len(img))); err == nil {
				t.Error("a truncated file unpacked")
			}
			corrupt := bytes.Clone(packed)
			corrupt[len(corrupt)/2] ^= 0xff
			os.WriteFile(src, corrupt, 0o644)
			if err := Unpack(ctx, src, c, filepath.Join(dir, "corrupt"), int64(len(img))); err == nil {
				t.Error("a corrupted file unpacked")
			}
			for _, name := range []string{"bomb", "cut", "corrupt"} {
				if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
					t.Errorf("%s left", name)
				}
			}
			if left, _ := filepath.Glob(filepath.Join(dir, "*.tmp")); len(left) > 0 {
				t.Errorf("left: %v", left)
			}
		})
	}
	raw := filepath.Join(t.TempDir(), "raw")
	os.WriteFile(raw, img[:4096], 0o644)
	if got, err := DetectCompression(raw); err != nil || got != NotCompressed {
		t.Errorf("raw: %q %v", got, err)
	}
}

func TestCollectUnpacked(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"old-unused", "old-linked", "new-unused", "x.123.tmp"} {
		os.WriteFile(filepath.Join(dir, f), []byte(f), 0o600)
	}
	os.Link(filepath.Join(dir, "old-linked"), filepath.Join(t.TempDir(), "base"))
	old := time.Now().Add(-48 * time.Hour)
	for _, f := range []string{"old-unused", "old-linked", "x.123.tmp"} {
		os.Chtimes(filepath.Join(dir, f), old, old)
	}
	removed, err := CollectUnpacked(dir, time.Now().Add(-24*time.Hour))
	if err != nil || len(removed) != 2 {
		t.Fatalf("%v %v", removed, err)
	}
	for _, f := range []string{"old-linked", "new-unused"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("%s removed", f)
		}
	}
}
