package assets

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/alephvm/alephvm/guest"
)

// Options says what Build builds and where.
type Options struct {
	Dir string // the cache directory
	// Init is the static alephvm-init binary to put in the initramfs.
	Init          string
	Suite         string // Debian suite of the roots; default "bookworm"
	KernelPackage string // default "linux-image-cloud-amd64"
	// Runtime and BaseImage ask for those assets; the kernel and the
	// initramfs are always built.
	Runtime, BaseImage bool
	RuntimePackages    []string // default DefaultRuntimePackages
	BaseImagePackages  []string // default DefaultBaseImagePackages
	// KeepModuleSignatures keeps the signatures of the initramfs's kernel
	// modules. By default they are stripped: the kernel checks them in
	// software at every boot (about 170 ms), and the cloud kernel does not
	// enforce them (it loads unsigned modules and marks itself tainted).
	// Keep them for a kernel that enforces signatures (lockdown,
	// module.sig_enforce=1).
	KeepModuleSignatures bool
	// Registry, when set, receives the runtime and the base images.
	Registry Registry
	Progress io.Writer // where to say what is being done; nil for nowhere
	Rebuild  bool      // rebuild even what is up to date
}

// The packages of the default roots.
var (
	DefaultRuntimePackages   = []string{"python3", "python3-uvicorn", "ca-certificates"}
	DefaultBaseImagePackages = []string{
		"systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus",
		"cloud-init", "cloud-guest-utils", "openssh-server", "qemu-guest-agent",
		"linux-image-cloud-amd64", "grub-pc-bin", "grub2-common",
		"ca-certificates", "iproute2", "netbase", "sudo", "less",
	}
)

// RuntimeUser is the unprivileged user (uid 1000) the default runtime has
// for workloads; it is guest.DefaultUser.
const RuntimeUser = guest.DefaultUser

// Build builds what opts asks for into opts.Dir, skipping what is up to
// date, and returns the manifest. Builds of one directory are serialised
// by a lock file.
func Build(ctx context.Context, opts Options) (Manifest, error) {
	if opts.Dir == "" {
		return Manifest{}, errors.New("assets: no cache directory")
	}
	if opts.Suite == "" {
		opts.Suite = "bookworm"
	}
	if opts.KernelPackage == "" {
		opts.KernelPackage = "linux-image-cloud-amd64"
	}
	if opts.RuntimePackages == nil {
		opts.RuntimePackages = DefaultRuntimePackages
	}
	if opts.BaseImagePackages == nil {
		opts.BaseImagePackages = DefaultBaseImagePackages
	}
	unlock, err := lock(ctx, opts.Dir)
	if err != nil {
		return Manifest{}, err
	}
	defer unlock()
	m, err := Load(opts.Dir)
	if err != nil {
		return m, err
	}
	b := &builder{opts: opts, m: m, p: newProgress(opts.Progress)}
	start := time.Now()
	for _, step := range []func(context.Context) error{b.kernel, b.initramfs, b.runtime, b.baseImage} {
		if err := step(ctx); err != nil {
			return m, err
		}
	}
	b.p.printf("assets", "up to date in %s (%s)", time.Since(start).Round(100*time.Millisecond), opts.Dir)
	return m, nil
}

type builder struct {
	opts Options
	m    Manifest
	p    *progress
	k    kernel
	kkey string
}

// upToDate reports whether every named asset was built from key.
func (b *builder) upToDate(key string, names ...Name) bool {
	if b.opts.Rebuild {
		return false
	}
	for _, n := range names {
		if _, ok := b.m.fresh(n, key); !ok {
			return false
		}
	}
	return true
}

// replace records a new file for an asset and removes the file it
// replaces, if no other asset uses it.
func (b *builder) replace(name Name, file, key, version string) (*Asset, error) {
	var old string
	if a, ok := b.m.Assets[name]; ok && a.File != file {
		old = a.File
	}
	a, err := b.m.record(name, file, key, version)
	if err != nil {
		return nil, err
	}
	if old != "" {
		inUse := false
		for _, other := range b.m.Assets {
			inUse = inUse || other.File == old
		}
		if !inUse {
			os.Remove(filepath.Join(b.m.Dir, old))
		}
	}
	b.p.printf(string(name), "%s, %s, sha256 %s", file, humanSize(a.Size), a.SHA256[:16])
	return a, nil
}

func (b *builder) kernel(ctx context.Context) error {
	k, err := resolveKernel(ctx, b.opts.KernelPackage)
	if err != nil {
		return err
	}
	b.k, b.kkey = k, inputKey("kernel", k.key())
	b.k.Dir = filepath.Join("kernel", k.Package+"_"+k.Version)
	if b.upToDate(b.kkey, KernelBzImage, KernelVmlinux) {
		b.p.printf("kernel", "%s %s is up to date", k.Package, k.Version)
		return nil
	}
	if err := fetchKernel(ctx, b.p, b.opts.Dir, &b.k); err != nil {
		return err
	}
	bzFile := filepath.Join(b.k.Dir, "boot", "vmlinuz-"+k.Release)
	bz, err := os.ReadFile(filepath.Join(b.opts.Dir, bzFile))
	if err != nil {
		return err
	}
	b.p.printf("kernel", "extracting vmlinux from %s", filepath.Base(bzFile))
	elf, err := extractVmlinux(bz)
	if err != nil {
		return fmt.Errorf("kernel %s: %w", bzFile, err)
	}
	vmlinuxFile := filepath.Join(b.k.Dir, "vmlinux")
	if err := writeFileAtomic(filepath.Join(b.opts.Dir, vmlinuxFile), elf, 0o644); err != nil {
		return err
	}
	if _, err := b.replace(KernelBzImage, bzFile, b.kkey, k.Version); err != nil {
		return err
	}
	_, err = b.replace(KernelVmlinux, vmlinuxFile, b.kkey, k.Version)
	return err
}

func (b *builder) initramfs(ctx context.Context) error {
	if b.opts.Init == "" {
		return errors.New("initramfs: no alephvm-init binary given")
	}
	if err := checkStatic(b.opts.Init); err != nil {
		return err
	}
	initSum, _, err := sha256File(b.opts.Init)
	if err != nil {
		return fmt.Errorf("init binary: %w", err)
	}
	key := inputKey("initramfs", b.kkey, initSum, strings.Join(guest.InitModules, ","), fmt.Sprint(b.opts.KeepModuleSignatures))
	if b.upToDate(key, Initramfs) {
		b.p.printf("initramfs", "up to date")
		return nil
	}
	km, err := openKernelModules(filepath.Join(b.opts.Dir, b.k.Dir, "lib", "modules", b.k.Release))
	if err != nil {
		return err
	}
	mods, err := km.closure(guest.InitModules)
	if err != nil {
		return err
	}
	initBinary, err := os.ReadFile(b.opts.Init)
	if err != nil {
		return err
	}
	file := filepath.Join("initramfs", key+".cpio")
	out := filepath.Join(b.opts.Dir, file)
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := writeInitramfs(out+".part", initBinary, km, mods, b.opts.KeepModuleSignatures); err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if err := os.Rename(out+".part", out); err != nil {
		return err
	}
	var names []string
	for _, m := range mods {
		if m.File != "" {
			names = append(names, m.Name)
		}
	}
	b.p.printf("initramfs", "alephvm-init and %d modules: %s", len(names), strings.Join(names, " "))
	_, err = b.replace(Initramfs, file, key, b.k.Release)
	return err
}

func (b *builder) runtime(ctx context.Context) error {
	if !b.opts.Runtime {
		return nil
	}
	sources, err := aptSources(ctx, b.opts.Suite)
	if err != nil {
		return err
	}
	pkgs := slices.Sorted(slices.Values(b.opts.RuntimePackages))
	key := inputKey("runtime", b.opts.Suite, sources, strings.Join(pkgs, ","), strings.Join(runtimeHooks, "\n"))
	if b.upToDate(key, Runtime) {
		b.p.printf("runtime", "up to date")
		return b.m.register(ctx, b.opts.Registry, b.m.Assets[Runtime])
	}
	file := filepath.Join("runtime", key+".squashfs")
	if err := buildRuntime(ctx, b.p, b.opts.Dir, file, b.opts.Suite, sources, pkgs); err != nil {
		return err
	}
	a, err := b.replace(Runtime, file, key, b.opts.Suite)
	if err != nil {
		return err
	}
	return b.m.register(ctx, b.opts.Registry, a)
}

// runtimeHooks finish the program runtime: the workload's user, the mount
// points, and no host identity (the init writes hostname and resolvers).
var runtimeHooks = []string{
	`chroot "$1" useradd --uid 1000 --user-group --create-home --shell /bin/sh ` + RuntimeUser,
	`mkdir -p "$1/opt/code" "$1/opt/packages" "$1/data"`,
	`rm -f "$1/etc/resolv.conf" "$1/etc/hostname" && : > "$1/etc/machine-id"`,
}

func buildRuntime(ctx context.Context, p *progress, dir, file, suite, sources string, pkgs []string) error {
	work := filepath.Join(dir, "runtime", ".build")
	os.RemoveAll(work)
	defer os.RemoveAll(work)
	root := filepath.Join(work, "root")
	p.printf("runtime", "Debian %s with %s (mmdebstrap takes about a minute)", suite, strings.Join(pkgs, ", "))
	d := debootstrap{suite: suite, sources: sources, variant: "minbase", packages: pkgs, hooks: runtimeHooks, target: root}
	if err := d.run(ctx, p, "runtime"); err != nil {
		return err
	}
	out := filepath.Join(dir, file)
	if err := p.run(ctx, "runtime", "mksquashfs", root, out+".part", "-comp", "zstd", "-noappend", "-no-progress", "-quiet"); err != nil {
		return err
	}
	return os.Rename(out+".part", out)
}

func humanSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
