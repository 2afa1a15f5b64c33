// Package baseimage builds the default base image of instances: Debian
// bookworm with systemd, cloud-init, openssh-server and qemu-guest-agent,
// built with mmdebstrap from the machine's own apt sources, in two forms:
//
//   - a bare ext4 root filesystem, booted with the kernel and initramfs
//     kept beside it (as Firecracker boots a root filesystem);
//   - a GPT disk that boots by itself through UEFI: an EFI system partition
//     with systemd-boot, the kernel and its initramfs, then the root
//     partition, last so that cloud-init can grow it to the whole disk.
//
// Nothing is mounted: the filesystems are made with mkfs.ext4 -d and, for
// the EFI partition and the partition table, in Go (go-diskfs).
package baseimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/kernelimage"
	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/partition/gpt"
)

// Suite is the Debian release of the image.
const Suite = "bookworm"

// packages go into the image; ifupdown is left out so that cloud-init
// renders the network for systemd-networkd, matching the NIC by MAC.
var packages = []string{
	"systemd-sysv", "udev", "dbus", "cloud-init", "openssh-server", "qemu-guest-agent",
	"linux-image-cloud-amd64", "systemd-boot-efi", "cloud-guest-utils", "fdisk", "e2fsprogs",
	"iproute2", "ca-certificates", "netbase", "ifupdown-",
}

// cloudConfig makes cloud-init look only at the NoCloud seed (never probe
// a metadata service on the network) and render for systemd-networkd.
const cloudConfig = `# alephvm: the seed is a NoCloud drive; never probe the network.
datasource_list: [NoCloud, None]
system_info:
  network:
    renderers: [networkd]
    activators: [networkd]
`

// customize prepares the tree: a generic image that each instance makes
// its own at first boot (machine id, SSH host keys), with no timer that
// would reach for package mirrors, root found by its label. Password
// logins are off in the file, and the form, that cloud-init's ssh_pwauth
// writes (the user-data sets it): finding it already so, cloud-init does
// not restart sshd at first boot, which refused the owner's connections
// made in that moment.
// Each is a mmdebstrap customize hook: a shell command run on the host
// with the root directory as $1.
var customize = []string{
	`printf '%s' "$ALEPHVM_CLOUD_CFG" > "$1/etc/cloud/cloud.cfg.d/90-alephvm.cfg"`,
	`echo 'LABEL=rootfs / ext4 defaults,discard,errors=remount-ro 0 1' > "$1/etc/fstab"`,
	`chroot "$1" systemctl enable systemd-networkd.service`,
	`chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer`,
	`rm -f "$1"/etc/ssh/ssh_host_*_key* && : > "$1/etc/machine-id" && rm -f "$1/var/lib/dbus/machine-id"`,
	`echo localhost > "$1/etc/hostname"`,
	`install -d -m 0755 "$1/etc/ssh/sshd_config.d" && install -m 0600 /dev/null "$1/etc/ssh/sshd_config.d/50-cloud-init.conf" && echo 'PasswordAuthentication no' > "$1/etc/ssh/sshd_config.d/50-cloud-init.conf"`,
	`passwd --root "$1" --lock root`,
	`rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*`,
	assets.AptPartialDirsHook,
}

// Image is a built base image.
type Image struct {
	Suite string `json:"suite"`
	// Ext4 is the bare root filesystem; Kernel (or the same kernel
	// uncompressed, Vmlinux, under Firecracker), Initrd and Cmdline boot it.
	// The initramfs carries virtio_mmio, which finds Firecracker's devices
	// through ACPI (the Debian kernel has no virtio_mmio.device= parameter).
	Ext4    string `json:"ext4"`
	Kernel  string `json:"kernel"`
	Vmlinux string `json:"vmlinux"`
	Initrd  string `json:"initrd"`
	Cmdline string `json:"cmdline"`
	// Disk is the UEFI-bootable GPT disk.
	Disk string `json:"disk"`
	// SHA256 of each output, by file name.
	SHA256  map[string]string `json:"sha256"`
	Recipe  string            `json:"recipe"`
	BuiltAt time.Time         `json:"built_at"`
}

// ManifestName is the file, in the build directory, describing the image.
const ManifestName = "base-image.json"

// recipe identifies what the image is built from: a change to the package
// list or the customization makes a new image.
func recipe() string {
	h := sha256.New()
	fmt.Fprintln(h, Suite, strings.Join(packages, ","), cloudConfig, strings.Join(customize, "\n"), espLayoutVersion, assets.SourceDateEpoch)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// Load returns the image built in dir, if it is there and current.
func Load(dir string) (Image, error) {
	data, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return Image{}, err
	}
	var img Image
	if err := json.Unmarshal(data, &img); err != nil {
		return Image{}, fmt.Errorf("read %s: %w", ManifestName, err)
	}
	if img.Recipe != recipe() {
		return Image{}, fmt.Errorf("base image in %s is from another recipe: rebuild it", dir)
	}
	for _, f := range []string{img.Ext4, img.Kernel, img.Initrd, img.Disk} {
		if _, err := os.Stat(f); err != nil {
			return Image{}, err
		}
	}
	if _, err := os.Stat(img.Vmlinux); img.Vmlinux == "" || err != nil {
		// An image built before it had one gets its vmlinux now, not a
		// rebuild.
		img.Vmlinux = filepath.Join(dir, "vmlinux")
		if err := writeVmlinux(img.Kernel, img.Vmlinux); err != nil {
			return Image{}, err
		}
		data, _ := json.MarshalIndent(img, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, ManifestName), data, 0o644); err != nil {
			return Image{}, err
		}
	}
	return img, nil
}

// writeVmlinux writes the uncompressed kernel of the bzImage kernel to
// dst, whole or not at all.
func writeVmlinux(kernel, dst string) error {
	bz, err := os.ReadFile(kernel)
	if err != nil {
		return err
	}
	elf, err := kernelimage.ExtractVmlinux(bz)
	if err != nil {
		return fmt.Errorf("vmlinux of %s: %w", kernel, err)
	}
	tmp := dst + ".part"
	if err := os.WriteFile(tmp, elf, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// Options are Build's settings; the zero value works.
type Options struct {
	Progress io.Writer    // where progress lines go; nil for nowhere
	Log      *slog.Logger // nil for none
	// PackageCache, when set, is a directory of .deb files shared by
	// builds (see assets.PackageCacheArgs); it does not change the image.
	PackageCache string
}

// Build builds the image into dir, unless a current one is there. The
// same packages give the same bytes (see reproducible.go).
func Build(ctx context.Context, dir string, opts Options) (Image, error) {
	if img, err := Load(dir); err == nil {
		return img, nil
	}
	progress, log := opts.Progress, opts.Log
	if progress == nil {
		progress = io.Discard
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if err := checkTools(exec.LookPath); err != nil {
		return Image{}, err
	}
	sources, err := assets.AptSources(ctx, Suite)
	if err != nil {
		return Image{}, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Image{}, err
	}
	work, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return Image{}, err
	}
	defer os.RemoveAll(work)
	step := func(format string, args ...any) { fmt.Fprintf(progress, "base image: "+format+"\n", args...) }

	tree := filepath.Join(work, "tree")
	step("building a Debian %s root with mmdebstrap (from this machine's apt sources)", Suite)
	args := []string{"--variant=apt", "--include=" + strings.Join(packages, ",")}
	if opts.PackageCache != "" {
		cache, err := assets.PackageCacheArgs(opts.PackageCache)
		if err != nil {
			return Image{}, err
		}
		args = append(args, cache...)
	}
	for _, hook := range customize {
		args = append(args, "--customize-hook="+hook)
	}
	// The sources on standard input ("-"): mmdebstrap writes them to the
	// root's /etc/apt/sources.list.
	args = append(args, Suite, tree, "-")
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	cmd.Stdin = strings.NewReader(sources)
	cmd.Env = append(os.Environ(), "ALEPHVM_CLOUD_CFG="+cloudConfig, sourceDateEpochEnv())
	cmd.Stdout, cmd.Stderr = progress, progress
	started := time.Now()
	if err := cmd.Run(); err != nil {
		return Image{}, fmt.Errorf("mmdebstrap: %w", err)
	}
	step("root built in %s", time.Since(started).Round(time.Second))

	kernel, initrd, err := bootFiles(tree)
	if err != nil {
		return Image{}, err
	}
	out := func(name string) string { return filepath.Join(work, name) }
	for name, src := range map[string]string{"vmlinuz": kernel, "initrd.img": initrd} {
		if err := copyFile(src, out(name)); err != nil {
			return Image{}, err
		}
	}
	if err := writeVmlinux(out("vmlinuz"), out("vmlinux")); err != nil {
		return Image{}, err
	}

	size, err := treeSize(tree)
	if err != nil {
		return Image{}, err
	}
	// Room for the journal, metadata and a first boot's writes; instances
	// grow it to their root disk's size.
	fsMiB := size*13/10>>20 + 256
	step("making the ext4 root filesystem (%d MiB)", fsMiB)
	if err := clampTimes(tree); err != nil {
		return Image{}, err
	}
	if err := mkfsExt4(ctx, tree, out("rootfs.ext4"), fsMiB); err != nil {
		return Image{}, err
	}
	step("making the UEFI disk")
	if err := makeDisk(out("disk.img"), out("rootfs.ext4"), out("vmlinuz"), out("initrd.img"), filepath.Join(tree, systemdBootEFI)); err != nil {
		return Image{}, err
	}

	img := Image{Suite: Suite, Recipe: recipe(), BuiltAt: time.Now().UTC(), SHA256: map[string]string{},
		Cmdline: "root=/dev/vda rw console=ttyS0"}
	for _, name := range []string{"rootfs.ext4", "vmlinuz", "vmlinux", "initrd.img", "disk.img"} {
		sum, err := fileSHA256(out(name))
		if err != nil {
			return Image{}, err
		}
		img.SHA256[name] = sum
		final := filepath.Join(dir, name)
		if err := os.Rename(out(name), final); err != nil {
			return Image{}, err
		}
		switch name {
		case "rootfs.ext4":
			img.Ext4 = final
		case "vmlinuz":
			img.Kernel = final
		case "vmlinux":
			img.Vmlinux = final
		case "initrd.img":
			img.Initrd = final
		case "disk.img":
			img.Disk = final
		}
	}
	data, _ := json.MarshalIndent(img, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, ManifestName), data, 0o644); err != nil {
		return Image{}, err
	}
	step("done in %s", time.Since(started).Round(time.Second))
	log.Info("base image built", "dir", dir, "took", time.Since(started).Round(time.Second))
	return img, nil
}

const systemdBootEFI = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"

// bootFiles finds the kernel and initramfs installed in the tree.
func bootFiles(tree string) (kernel, initrd string, err error) {
	kernels, _ := filepath.Glob(filepath.Join(tree, "boot", "vmlinuz-*"))
	initrds, _ := filepath.Glob(filepath.Join(tree, "boot", "initrd.img-*"))
	if len(kernels) != 1 || len(initrds) != 1 {
		return "", "", fmt.Errorf("want one kernel and one initramfs in the image's /boot, found %v and %v", kernels, initrds)
	}
	return kernels[0], initrds[0], nil
}

func treeSize(root string) (int64, error) {
	var total int64
	err := filepath.Walk(root, func(_ string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			total += info.Size()
		}
		return nil
	})
	return total, err
}

// mkfsExt4 makes the ext4 root filesystem from tree, the same bytes from
// the same tree: its UUID and directory hash seed derived from the
// recipe, every time it writes at SourceDateEpoch, the entries it adds
// in byte order (mke2fs sorts them with the locale's collation).
func mkfsExt4(ctx context.Context, tree, path string, sizeMiB int64) error {
	cmd := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "rootfs", "-U", fsUUID("uuid"), "-d", tree,
		"-E", "root_owner=0:0,hash_seed="+fsUUID("hash_seed"), path, fmt.Sprintf("%dM", sizeMiB))
	cmd.Env = append(os.Environ(), fakeTimeEnv(), "LC_ALL=C")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return settleInodeTimes(ctx, path)
}

// espLayoutVersion changes when makeDisk's layout does.
// Version 2: the disk's and the EFI partition's GUIDs, FAT times and
// volume id are fixed (reproducible builds).
const espLayoutVersion = 2

// RootPartUUID is the root partition's GUID, so that the boot entry can
// name it.
const RootPartUUID = "5e9c3f1c-7b3e-4a55-9a52-a1e9f0c0a1ef"

// The disk's GUID and the EFI system partition's, fixed so that the same
// files make the same disk.
const (
	diskGUID    = "a1e9f0c0-5e9c-4f1c-8b3e-7b3e4a559a52"
	espPartUUID = "c12a7328-0000-4a55-9a52-a1e9f0c0a1ef"
)

const (
	sector   = 512
	espMiB   = 128
	alignMiB = 1
)

// makeDisk writes a GPT disk: an EFI system partition with systemd-boot,
// the kernel and initramfs and a boot entry, then the root partition
// holding rootfs.
func makeDisk(path, rootfs, kernel, initrd, bootEFI string) error {
	st, err := os.Stat(rootfs)
	if err != nil {
		return err
	}
	const mib = 1 << 20
	espStart := uint64(alignMiB * mib / sector)
	espEnd := espStart + espMiB*mib/sector - 1
	rootStart := espEnd + 1
	rootEnd := rootStart + uint64(st.Size())/sector - 1
	total := int64(rootEnd+1)*sector + mib // room for the backup GPT
	_ = os.Remove(path)
	d, err := diskfs.Create(path, total, diskfs.SectorSizeDefault)
	if err != nil {
		return fmt.Errorf("create disk: %w", err)
	}
	defer d.Close()
	table := &gpt.Table{
		LogicalSectorSize: sector, PhysicalSectorSize: sector, ProtectiveMBR: true, GUID: diskGUID,
		Partitions: []*gpt.Partition{
			{Index: 1, Start: espStart, End: espEnd, Type: gpt.EFISystemPartition, Name: "ESP", GUID: espPartUUID},
			{Index: 2, Start: rootStart, End: rootEnd, Type: gpt.LinuxFilesystem, Name: "rootfs", GUID: RootPartUUID},
		},
	}
	if err := d.Partition(table); err != nil {
		return fmt.Errorf("partition disk: %w", err)
	}
	// go-diskfs times the FAT entries it writes by SOURCE_DATE_EPOCH in
	// this process's environment, and by the clock without it.
	restore := setSourceDateEpoch()
	defer restore()
	fs, err := d.CreateFilesystem(disk.FilesystemSpec{Partition: 1, FSType: filesystem.TypeFat32, VolumeLabel: "ESP", Reproducible: true})
	if err != nil {
		return fmt.Errorf("make EFI system partition: %w", err)
	}
	entry := "title Debian " + Suite + " (alephvm base image)\nlinux /vmlinuz\ninitrd /initrd.img\n" +
		"options root=PARTUUID=" + RootPartUUID + " rw console=tty0 console=ttyS0\n"
	files := []struct {
		name string
		from string
		text string
	}{
		{name: "EFI/BOOT/BOOTX64.EFI", from: bootEFI},
		{name: "vmlinuz", from: kernel},
		{name: "initrd.img", from: initrd},
		{name: "loader/loader.conf", text: "default alephvm.conf\ntimeout 0\n"},
		{name: "loader/entries/alephvm.conf", text: entry},
	}
	for _, f := range files {
		if dir := filepath.Dir(f.name); dir != "." {
			if err := fs.Mkdir(dir); err != nil {
				return fmt.Errorf("EFI partition: mkdir %s: %w", dir, err)
			}
		}
		w, err := fs.OpenFile(f.name, os.O_CREATE|os.O_RDWR)
		if err != nil {
			return fmt.Errorf("EFI partition: %s: %w", f.name, err)
		}
		if f.from != "" {
			src, err := os.Open(f.from)
			if err != nil {
				return err
			}
			_, err = io.Copy(w, src)
			src.Close()
			if err != nil {
				return fmt.Errorf("EFI partition: %s: %w", f.name, err)
			}
		} else if _, err := w.Write([]byte(f.text)); err != nil {
			return fmt.Errorf("EFI partition: %s: %w", f.name, err)
		}
	}
	src, err := os.Open(rootfs)
	if err != nil {
		return err
	}
	defer src.Close()
	if _, err := d.WritePartitionContents(2, src); err != nil {
		return fmt.Errorf("write root partition: %w", err)
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
