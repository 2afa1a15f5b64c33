package assets

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/kernelimage"
)

// Options says what Build builds and where.
type Options struct {
	Dir string // the cache directory
	// Init is the static alephvm-init binary to put in the initramfs.
	Init          string
	Suite         string // Debian suite of the roots; default "bookworm"
	KernelPackage string // default "linux-image-cloud-amd64"
	// Runtime asks for the default runtime; the kernel and the initramfs
	// are always built. (The instance base image is package baseimage's.)
	Runtime         bool
	RuntimePackages []string // default DefaultRuntimePackages
	// KeepModuleSignatures keeps the signatures of the initramfs's kernel
	// modules. By default they are stripped: the kernel checks them in
	// software at every boot (about 170 ms), and the cloud kernel does not
	// enforce them (it loads unsigned modules and marks itself tainted).
	// Keep them for a kernel that enforces signatures (lockdown,
	// module.sig_enforce=1).
	KeepModuleSignatures bool
	// Registry, when set, receives the runtime.
	Registry Registry
	// PackageCache, when set, is a directory of downloaded .deb files
	// that Debian roots are built from when they have the version apt
	// wants, and that new downloads are added to. Builds in two cache
	// directories can share one; it does not change what is built.
	PackageCache string
	Progress     io.Writer // where to say what is being done; nil for nowhere
	Rebuild      bool      // rebuild even what is up to date
}

// DefaultRuntimePackages are the packages of the default runtime.
var DefaultRuntimePackages = []string{"python3", "python3-uvicorn", "ca-certificates"}

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
	if err := checkTools(opts); err != nil {
		return Manifest{}, err
	}
	if opts.Init == "" {
		return Manifest{}, errors.New("assets: no alephvm-init binary given")
	}
	if err := checkStatic(opts.Init); err != nil {
		return Manifest{}, err
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
	for _, step := range []func(context.Context) error{b.kernel, b.initramfs, b.runtime} {
		if err := step(ctx); err != nil {
			return m, err
		}
	}
	b.p.printf("assets", "up to date in %s (%s)", time.Since(start).Round(100*time.Millisecond), opts.Dir)
	return m, b.m.collect(time.Now().Add(-keepReplaced))
}

// keepReplaced is how long a replaced asset's file stays in the cache.
const keepReplaced = time.Hour

// collect removes the files of the build directories that no asset uses
// and that were last changed before cutoff: replaced assets, and the
// leftovers of interrupted builds.
func (m Manifest) collect(cutoff time.Time) error {
	used := func(rel string) bool {
		for _, a := range m.Assets {
			if a.File == rel || strings.HasPrefix(a.File, rel+string(filepath.Separator)) {
				return true
			}
		}
		return false
	}
	var errs []error
	// base-image: where caches made before baseimage took the instance
	// base image kept it, collected like the rest.
	for _, dir := range []string{"kernel", "initramfs", "runtime", "base-image"} {
		entries, _ := os.ReadDir(filepath.Join(m.Dir, dir))
		for _, e := range entries {
			rel := filepath.Join(dir, e.Name())
			info, err := e.Info()
			if err != nil || used(rel) || info.ModTime().After(cutoff) {
				continue
			}
			if err := os.RemoveAll(filepath.Join(m.Dir, rel)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// checkTools makes sure the programs the build runs are installed.
func checkTools(opts Options) error {
	tools := map[string]string{"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg"}
	if opts.Runtime {
		tools["mmdebstrap"] = "mmdebstrap"
		tools["mksquashfs"] = "squashfs-tools"
	}
	var missing []string
	for _, tool := range slices.Sorted(maps.Keys(tools)) {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, fmt.Sprintf("%s (Debian package %s)", tool, tools[tool]))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("assets: missing %s", strings.Join(missing, ", "))
	}
	return nil
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

// replace records a new file for an asset. The file it replaces stays
// for a while (see collect): a VM may be about to boot from it.
func (b *builder) replace(name Name, file, key, version string) (*Asset, error) {
	a, err := b.m.record(name, file, key, version)
	if err != nil {
		return nil, err
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
	if err := fetchKernel(ctx, b.p, b.opts.Dir, b.opts.PackageCache, &b.k); err != nil {
		return err
	}
	bzFile := filepath.Join(b.k.Dir, "boot", "vmlinuz-"+k.Release)
	bz, err := os.ReadFile(filepath.Join(b.opts.Dir, bzFile))
	if err != nil {
		return err
	}
	b.p.printf("kernel", "extracting vmlinux from %s", filepath.Base(bzFile))
	elf, err := kernelimage.ExtractVmlinux(bz)
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
	return b.debian(ctx, debianAsset{
		step: "runtime", dir: "runtime", packages: b.opts.RuntimePackages, hooks: runtimeHooks,
		outputs: map[Name]string{Runtime: ".squashfs"},
		images: func(ctx context.Context, p *progress, root string, out map[Name]string) error {
			// SOURCE_DATE_EPOCH sets the image's creation time and
			// clamps every later file time to it (mksquashfs refuses it
			// beside -mkfs-time or -all-time); -reproducible, the
			// default, writes the files in the same order every time.
			cmd := command(ctx, "mksquashfs", root, out[Runtime], "-comp", "zstd", "-reproducible", "-noappend", "-no-progress", "-quiet")
			cmd.Env = append(os.Environ(), sourceDateEpochEnv())
			return p.runCmd("runtime", cmd)
		},
	})
}

// runtimeHooks finish the program runtime: the workload's user, the mount
// points, and no host identity (the init writes hostname and resolvers).
var runtimeHooks = []string{
	`chroot "$1" useradd --uid 1000 --user-group --create-home --shell /bin/sh ` + RuntimeUser,
	`mkdir -p "$1/opt/code" "$1/opt/packages" "$1/data"`,
	`rm -f "$1/etc/resolv.conf" "$1/etc/hostname" && : > "$1/etc/machine-id"`,
	AptPartialDirsHook,
}

// AptPartialDirsHook is a customize hook that gives apt's download
// directories to its sandbox user _apt, as apt does only when that user can
// reach the build directory (not under a 0700 parent): without it, the same
// packages built in two directories make two images. Directories an
// earlier hook removed are left alone.
const AptPartialDirsHook = `for d in /var/lib/apt/lists/partial /var/cache/apt/archives/partial; do if [ -d "$1$d" ]; then chroot "$1" chown _apt:root "$d"; fi; done`

// debianAsset is a build step that makes images of a Debian root.
type debianAsset struct {
	step, dir string          // its name in the progress; its directory in the cache
	packages  []string        // installed in a minbase root
	hooks     []string        // mmdebstrap customize hooks
	outputs   map[Name]string // the assets it makes, with their file extension
	// images makes the outputs (by name, the paths to write) from the root.
	images func(ctx context.Context, p *progress, root string, out map[Name]string) error
}

// debian runs a Debian step unless its assets are up to date, then
// registers them.
func (b *builder) debian(ctx context.Context, d debianAsset) error {
	sources, err := AptSources(ctx, b.opts.Suite)
	if err != nil {
		return err
	}
	pkgs := slices.Sorted(slices.Values(d.packages))
	key := inputKey(d.dir, b.opts.Suite, sources, strings.Join(pkgs, ","), strings.Join(d.hooks, "\n"), strconv.FormatInt(SourceDateEpoch, 10))
	names := slices.Sorted(maps.Keys(d.outputs))
	if b.upToDate(key, names...) {
		b.p.printf(d.step, "up to date")
	} else if err := b.buildDebian(ctx, d, key, sources, pkgs); err != nil {
		return err
	}
	for _, n := range names {
		if err := b.m.register(ctx, b.opts.Registry, b.m.Assets[n]); err != nil {
			return err
		}
	}
	return nil
}

func (b *builder) buildDebian(ctx context.Context, d debianAsset, key, sources string, pkgs []string) error {
	work := filepath.Join(b.opts.Dir, d.dir, ".build")
	os.RemoveAll(work)
	defer os.RemoveAll(work)
	root := filepath.Join(work, "root")
	b.p.printf(d.step, "Debian %s with %s (mmdebstrap takes a minute or more)", b.opts.Suite, strings.Join(pkgs, ", "))
	boot := debootstrap{suite: b.opts.Suite, sources: sources, variant: "minbase", packages: pkgs, hooks: d.hooks, target: root,
		packageCache: b.opts.PackageCache}
	if err := boot.run(ctx, b.p, d.step); err != nil {
		return err
	}
	files, parts := map[Name]string{}, map[Name]string{}
	for n, ext := range d.outputs {
		files[n] = filepath.Join(d.dir, key+ext)
		parts[n] = filepath.Join(b.opts.Dir, files[n]) + ".part"
	}
	if err := d.images(ctx, b.p, root, parts); err != nil {
		return err
	}
	for _, n := range slices.Sorted(maps.Keys(files)) {
		if err := os.Rename(parts[n], filepath.Join(b.opts.Dir, files[n])); err != nil {
			return err
		}
		if _, err := b.replace(n, files[n], key, b.opts.Suite); err != nil {
			return err
		}
	}
	return nil
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
