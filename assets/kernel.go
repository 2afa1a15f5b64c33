package assets

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
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
