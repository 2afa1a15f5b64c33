package assets

import (
	"bufio"
	"bytes"
	"context"
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
// unless it is already there. With a package cache, a .deb of the same
// version found there is not downloaded again, and one downloaded is
// added to it.
func fetchKernel(ctx context.Context, p *progress, dir, packageCache string, k *kernel) error {
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
	deb := cachedDeb(ctx, packageCache, k.Package, k.Version)
	if deb == "" {
		if deb, err = downloadDeb(ctx, p, tmp, k.Package, k.Version); err != nil {
			return err
		}
		if packageCache != "" {
			if err := os.MkdirAll(packageCache, 0o755); err != nil {
				return err
			}
			if err := copyFileAtomic(deb, filepath.Join(packageCache, filepath.Base(deb))); err != nil {
				return fmt.Errorf("package cache: %w", err)
			}
		}
	} else {
		p.printf("kernel", "%s %s from the package cache", k.Package, k.Version)
	}
	tree := filepath.Join(tmp, "tree")
	if err := p.run(ctx, "kernel", "dpkg-deb", "-x", deb, tree); err != nil {
		return err
	}
	os.RemoveAll(final)
	return os.Rename(tree, final)
}

// downloadDeb downloads a package's .deb into dir and returns its path.
func downloadDeb(ctx context.Context, p *progress, dir, pkg, version string) (string, error) {
	// apt drops privileges to _apt for downloads when it can write there.
	os.Chmod(dir, 0o777)
	p.printf("kernel", "downloading %s %s", pkg, version)
	dl := command(ctx, "apt-get", "download", pkg+"="+version)
	dl.Dir = dir
	if out, err := dl.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download %s: %w: %s", pkg, err, bytes.TrimSpace(out))
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("apt-get download %s: want one .deb, got %d", pkg, len(debs))
	}
	return debs[0], nil
}

// cachedDeb returns the .deb of pkg at version in the package cache, or
// "" when there is none.
func cachedDeb(ctx context.Context, packageCache, pkg, version string) string {
	if packageCache == "" {
		return ""
	}
	debs, _ := filepath.Glob(filepath.Join(packageCache, pkg+"_*.deb"))
	for _, deb := range debs {
		control, err := output(ctx, "dpkg-deb", "--field", deb, "Package", "Version")
		if err == nil && debField(control, "Package") == pkg && debField(control, "Version") == version {
			return deb
		}
	}
	return ""
}

// copyFileAtomic copies src to dst, whole or not at all.
func copyFileAtomic(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".part"
	out, err := os.Create(tmp)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, dst)
}
