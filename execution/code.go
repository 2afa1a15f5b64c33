package execution

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"

	"github.com/alephvm/alephvm/message"
)

// Limits on archives unpacked on the host: a zip bomb must not fill the
// node's disk.
const (
	maxUnpackedBytes = 4 << 30
	maxUnpackedFiles = 200_000
)

// Squashfs returns a squashfs image holding the code or data in src, so
// that the guest mounts every code and data item the same way: a squashfs
// is used as it is, a zip is unpacked, a plain file is put alone under the
// name plainName. Results are cached in cacheDir by the source's sha256.
func Squashfs(ctx context.Context, cacheDir, src, sha256 string, enc message.Encoding, plainName string) (string, error) {
	if enc == message.EncodingSquashfs {
		return src, nil
	}
	if enc != message.EncodingZip && enc != message.EncodingPlain {
		return "", fmt.Errorf("unknown encoding %q", enc)
	}
	name := sha256 + "-" + string(enc)
	if enc == message.EncodingPlain {
		if plainName == "" || strings.ContainsAny(plainName, "/\x00") || plainName == "." || plainName == ".." {
			return "", fmt.Errorf("plain code needs a file name, got %q", plainName)
		}
		name += "-" + plainName
	}
	out := filepath.Join(cacheDir, name+".squashfs")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", err
	}
	tree, err := os.MkdirTemp(cacheDir, ".unpack-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tree)
	switch enc {
	case message.EncodingZip:
		err = unzip(src, tree)
	case message.EncodingPlain:
		err = copyFile(src, filepath.Join(tree, plainName), 0o755)
	}
	if err != nil {
		return "", fmt.Errorf("unpack %s code: %w", enc, err)
	}
	tmp := out + ".tmp"
	_ = os.Remove(tmp)
	cmd := exec.CommandContext(ctx, "mksquashfs", tree, tmp, "-noappend", "-quiet", "-no-progress", "-all-root", "-comp", "zstd")
	if msg, err := cmd.CombinedOutput(); err != nil {
		_ = os.Remove(tmp)
		return "", fmt.Errorf("mksquashfs: %w: %s", err, strings.TrimSpace(string(msg)))
	}
	if err := os.Rename(tmp, out); err != nil {
		_ = os.Remove(tmp)
		return "", err
	}
	return out, nil
}

// unzip extracts regular files and directories of a zip into dir, refusing
// paths that escape it and archives past the size limits. Links and other
// special entries are refused.
func unzip(src, dir string) error {
	r, err := zip.OpenReader(src)
	if err != nil {
		return err
	}
	defer r.Close()
	if len(r.File) > maxUnpackedFiles {
		return fmt.Errorf("archive has %d entries, at most %d are unpacked", len(r.File), maxUnpackedFiles)
	}
	var total int64
	for _, f := range r.File {
		name := path.Clean(f.Name)
		if path.IsAbs(f.Name) || name == ".." || strings.HasPrefix(name, "../") {
			return fmt.Errorf("entry %q: outside the archive's root", f.Name)
		}
		if name == "." {
			continue
		}
		target := filepath.Join(dir, filepath.FromSlash(name))
		mode := f.Mode()
		switch {
		case mode.IsDir():
			if err := os.MkdirAll(target, 0o755); err != nil {
				return err
			}
			continue
		case !mode.IsRegular():
			return fmt.Errorf("entry %q: only files and directories are unpacked, not %s", f.Name, mode.Type())
		}
		total += int64(f.UncompressedSize64)
		if total > maxUnpackedBytes || f.UncompressedSize64 > maxUnpackedBytes {
			return fmt.Errorf("archive unpacks to more than %d bytes", int64(maxUnpackedBytes))
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		if err := extract(f, target); err != nil {
			return fmt.Errorf("entry %q: %w", f.Name, err)
		}
	}
	return nil
}

func extract(f *zip.File, target string) error {
	rc, err := f.Open()
	if err != nil {
		return err
	}
	defer rc.Close()
	perm := os.FileMode(0o644)
	if f.Mode()&0o111 != 0 {
		perm = 0o755
	}
	w, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	// The header's size may lie: never write more than it announced.
	n, err := io.Copy(w, io.LimitReader(rc, int64(f.UncompressedSize64)+1))
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err == nil && n > int64(f.UncompressedSize64) {
		err = errors.New("entry is larger than its header says")
	}
	return err
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}
