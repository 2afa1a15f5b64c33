package assets

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// kernel is an unpacked Debian kernel package in the cache.
type kernel struct {
	Package string // linux-image-6.1.0-56-cloud-amd64
	Version string // 6.1.192-2, the package's version
	Release string // 6.1.0-56-cloud-amd64, the kernel's release (uname -r)
	Dir     string // the unpacked package, relative to the cache directory
}

func (k kernel) key() string { return k.Package + "=" + k.Version }

// resolveKernel finds the kernel package a metapackage such as
// linux-image-cloud-amd64 depends on, and its candidate version, from the
// machine's apt lists.
func resolveKernel(ctx context.Context, meta string) (kernel, error) {
	out, err := output(ctx, "apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", meta)
	if err != nil {
		return kernel{}, fmt.Errorf("resolve %s (is apt-get update needed?): %w", meta, err)
	}
	pkg := ""
	for _, line := range strings.Split(out, "\n") {
		if dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: "); ok && strings.HasPrefix(dep, "linux-image-") {
			pkg = strings.TrimSpace(dep)
			break
		}
	}
	if pkg == "" {
		pkg = meta // already a versioned kernel package
	}
	show, err := output(ctx, "apt-cache", "show", "--no-all-versions", pkg)
	if err != nil {
		return kernel{}, fmt.Errorf("resolve %s: %w", pkg, err)
	}
	version := debField(show, "Version")
	if version == "" {
		return kernel{}, fmt.Errorf("no version for %s in the apt lists", pkg)
	}
	return kernel{Package: pkg, Version: version, Release: strings.TrimPrefix(pkg, "linux-image-")}, nil
}

// debField returns a field of the first paragraph of Debian control text.
func debField(control, name string) string {
	sc := bufio.NewScanner(strings.NewReader(control))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+": "); ok {
			return strings.TrimSpace(v)
		}
		if sc.Text() == "" {
			break
		}
	}
	return ""
}

// fetchKernel downloads and unpacks the kernel package into the cache,
// unless it is already there.
func fetchKernel(ctx context.Context, p *progress, dir string, k *kernel) error {
	k.Dir = filepath.Join("kernel", k.Package+"_"+k.Version)
	final := filepath.Join(dir, k.Dir)
	if _, err := os.Stat(filepath.Join(final, "boot", "vmlinuz-"+k.Release)); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Join(dir, "kernel"), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Join(dir, "kernel"), ".download-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	// apt drops privileges to _apt for downloads when it can write there.
	os.Chmod(tmp, 0o777)
	p.printf("kernel", "downloading %s %s", k.Package, k.Version)
	dl := command(ctx, "apt-get", "download", k.Package+"="+k.Version)
	dl.Dir = tmp
	if out, err := dl.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get download %s: %w: %s", k.Package, err, bytes.TrimSpace(out))
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("apt-get download %s: want one .deb, got %d", k.Package, len(debs))
	}
	tree := filepath.Join(tmp, "tree")
	if err := p.run(ctx, "kernel", "dpkg-deb", "-x", debs[0], tree); err != nil {
		return err
	}
	os.RemoveAll(final)
	return os.Rename(tree, final)
}

// bzImage setup header fields (Linux boot protocol, Documentation/x86/boot.rst).
const (
	setupSectsOffset    = 0x1f1
	headerMagicOffset   = 0x202
	bootVersionOffset   = 0x206
	payloadOffsetOffset = 0x248
	payloadLengthOffset = 0x24c
)

// extractVmlinux returns the uncompressed kernel (an ELF file) inside a
// bzImage, as Firecracker needs it. Debian's cloud kernel is compressed
// with LZ4; gzip is handled too.
func extractVmlinux(bz []byte) ([]byte, error) {
	if len(bz) < 0x250 || string(bz[headerMagicOffset:headerMagicOffset+4]) != "HdrS" {
		return nil, errors.New("not a bzImage: no HdrS setup header")
	}
	if v := binary.LittleEndian.Uint16(bz[bootVersionOffset:]); v < 0x208 {
		return nil, fmt.Errorf("boot protocol %#x has no payload fields (want 2.08 or later)", v)
	}
	setupSects := int(bz[setupSectsOffset])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(bz[payloadOffsetOffset:]))
	length := int(binary.LittleEndian.Uint32(bz[payloadLengthOffset:]))
	if start < 0 || length <= 0 || start+length > len(bz) {
		return nil, fmt.Errorf("payload at %d+%d is outside the %d-byte image", start, length, len(bz))
	}
	payload := bz[start : start+length]
	var out []byte
	var err error
	switch {
	case bytes.HasPrefix(payload, lz4LegacyMagic):
		out, err = decodeLZ4Legacy(payload)
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		var zr *gzip.Reader
		if zr, err = gzip.NewReader(bytes.NewReader(payload)); err == nil {
			zr.Multistream(false)
			out, err = io.ReadAll(zr)
		}
	default:
		return nil, fmt.Errorf("kernel payload compressed with an unsupported method (magic % x): use an LZ4 or gzip kernel such as linux-image-cloud-amd64", payload[:min(6, len(payload))])
	}
	if err != nil {
		return nil, fmt.Errorf("decompress kernel payload: %w", err)
	}
	if !bytes.HasPrefix(out, []byte("\x7fELF")) {
		return nil, errors.New("the kernel payload is not an ELF file")
	}
	return out, nil
}
