// Package assets builds, caches and finds what program VMs boot from: the
// kernel (Debian's cloud kernel, as a bzImage for QEMU and as an
// uncompressed vmlinux for Firecracker), the initramfs holding
// alephvm-init and the kernel modules it loads, and the default program
// runtime (a Debian squashfs with python3 and uvicorn); FindProgramKernel
// says which kernel and initramfs the node boots programs with. It also
// fetches files pinned by sha256 in a fetch manifest. The instance base
// image is package baseimage's.
//
// Every asset is recorded in the cache directory's manifest.json with its
// size, sha256, the key of the inputs it was built from and, once
// registered in the content store, its ref. Build rebuilds only what is
// missing or whose inputs changed. Debian packages come from the
// machine's own apt sources: no mirror host is written in this package.
// docs/assets.md describes the layout.
package assets

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"time"
)

// Name names an asset in the manifest.
type Name string

// The built assets.
const (
	KernelBzImage Name = "kernel.bzimage"   // for QEMU's -kernel
	KernelVmlinux Name = "kernel.vmlinux"   // uncompressed ELF, for Firecracker
	Initramfs     Name = "initramfs"        // alephvm-init and its kernel modules (cpio)
	Runtime       Name = "runtime"          // the default program runtime (squashfs)
	fetchedPrefix      = "fetched/"         // fetched files are named fetched/<name>
	manifestFile       = "manifest.json"    // in the cache directory
	lockFile           = ".lock"            // held while building or fetching
	sha256HexLen       = sha256.Size * 2    //
	recipeVersion      = "alephvm-assets-2" // part of every key: bump it when a build step's code changes
)

// Asset is one file of the cache.
type Asset struct {
	Name    Name      `json:"name"`
	File    string    `json:"file"` // relative to the cache directory
	Size    int64     `json:"size"`
	SHA256  string    `json:"sha256"`
	Key     string    `json:"key"`               // hash of the inputs it was built from
	Version string    `json:"version,omitempty"` // e.g. the kernel package's version
	Ref     string    `json:"ref,omitempty"`     // its ref in the content store, once registered
	Built   time.Time `json:"built"`
}

// Manifest lists the assets of a cache directory.
type Manifest struct {
	Dir    string          `json:"-"`
	Assets map[Name]*Asset `json:"assets"`
}

// Load reads the manifest of the cache directory dir; a directory without
// one has an empty manifest.
func Load(dir string) (Manifest, error) {
	m := Manifest{Dir: dir, Assets: map[Name]*Asset{}}
	b, err := os.ReadFile(filepath.Join(dir, manifestFile))
	if errors.Is(err, os.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return m, fmt.Errorf("read asset manifest: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("asset manifest %s: %w", filepath.Join(dir, manifestFile), err)
	}
	if m.Assets == nil {
		m.Assets = map[Name]*Asset{}
	}
	return m, nil
}

// Path returns the path of an asset, which must exist.
func (m Manifest) Path(name Name) (string, error) {
	a, ok := m.Assets[name]
	if !ok {
		return "", fmt.Errorf("asset %s is not built (alephvm assets build)", name)
	}
	p := filepath.Join(m.Dir, a.File)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("asset %s: %w", name, err)
	}
	return p, nil
}

// List returns the assets sorted by name.
func (m Manifest) List() []Asset {
	out := make([]Asset, 0, len(m.Assets))
	for _, a := range m.Assets {
		out = append(out, *a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (m Manifest) save() error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(m.Dir, manifestFile), append(b, '\n'), 0o644)
}

// fresh returns the asset recorded under name if it was built from key
// and its file is still there with its size.
func (m Manifest) fresh(name Name, key string) (*Asset, bool) {
	a, ok := m.Assets[name]
	if !ok || a.Key != key {
		return nil, false
	}
	st, err := os.Stat(filepath.Join(m.Dir, a.File))
	if err != nil || st.Size() != a.Size {
		return nil, false
	}
	return a, true
}

// record checksums the file of a new asset and adds it to the manifest,
// which is saved.
func (m Manifest) record(name Name, file, key, version string) (*Asset, error) {
	p := filepath.Join(m.Dir, file)
	sum, size, err := sha256File(p)
	if err != nil {
		return nil, fmt.Errorf("checksum %s: %w", name, err)
	}
	a := &Asset{Name: name, File: file, Size: size, SHA256: sum, Key: key, Version: version, Built: time.Now().UTC().Truncate(time.Second)}
	if old, ok := m.Assets[name]; ok && old.SHA256 == sum {
		a.Ref = old.Ref
	}
	m.Assets[name] = a
	return a, m.save()
}

// Registry is the content store, as far as assets use it: it takes a file
// and returns the ref under which messages can name it.
type Registry interface {
	AddFile(ctx context.Context, path string) (ref string, err error)
}

// register adds an asset to the registry unless it already has a ref.
func (m Manifest) register(ctx context.Context, reg Registry, a *Asset) error {
	if reg == nil || a.Ref != "" {
		return nil
	}
	ref, err := reg.AddFile(ctx, filepath.Join(m.Dir, a.File))
	if err != nil {
		return fmt.Errorf("register %s in the store: %w", a.Name, err)
	}
	a.Ref = ref
	return m.save()
}

// lock takes the cache directory's lock, waiting for another build or
// fetch to finish.
func lock(ctx context.Context, dir string) (unlock func(), err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func sha256File(path string) (sum string, size int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	size, err = io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), size, nil
}

// inputKey hashes the inputs of a build step.
func inputKey(parts ...string) string {
	h := sha256.New()
	for _, p := range append([]string{recipeVersion}, parts...) {
		fmt.Fprintf(h, "%d:%s\n", len(p), p)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	tmp := path + ".part"
	if err := os.WriteFile(tmp, data, perm); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// SourceDateEpoch is the time the images built from Debian packages
// claim, so that the same packages make the same bytes on any node and
// any day: mmdebstrap and the package scripts it runs see it as
// SOURCE_DATE_EPOCH (the password dates of /etc/shadow, .pyc files
// checked by hash instead of by their source's time), and every file time
// after it is clamped to it. It is a constant rather than the newest
// package's time, which would need the packages before the build starts;
// it is part of the keys of the Debian steps.
const SourceDateEpoch int64 = 1767225600 // 2026-01-01T00:00:00Z

func sourceDateEpochEnv() string {
	return "SOURCE_DATE_EPOCH=" + strconv.FormatInt(SourceDateEpoch, 10)
}
