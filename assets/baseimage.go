package assets

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// The base image's root filesystem has this label in both forms; its
// fstab and the GRUB configuration find it by it.
const rootLabel = "rootfs"

// baseHooks finish the instance base image: cloud-init reads a NoCloud
// seed (and, without ifupdown or netplan, renders the network for
// systemd-networkd), no host identity or SSH host key is baked in, and
// GRUB's core image is made for the partitioned form.
var baseHooks = []string{
	`echo 'datasource_list: [NoCloud, None]' > "$1/etc/cloud/cloud.cfg.d/90-alephvm.cfg"`,
	`chroot "$1" systemctl enable systemd-networkd.service systemd-resolved.service`,
	`ln -sf /run/systemd/resolve/stub-resolv.conf "$1/etc/resolv.conf"`,
	`echo 'LABEL=` + rootLabel + ` / ext4 defaults,errors=remount-ro 0 1' > "$1/etc/fstab"`,
	`rm -f "$1"/etc/ssh/ssh_host_* "$1/etc/hostname" && : > "$1/etc/machine-id"`,
	// Boot does not wait two minutes for a network that is not configured.
	`mkdir -p "$1/etc/systemd/system/systemd-networkd-wait-online.service.d" && printf '[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20\n' > "$1/etc/systemd/system/systemd-networkd-wait-online.service.d/alephvm.conf"`,
	`mkdir -p "$1/boot/grub" && cp -a "$1/usr/lib/grub/i386-pc" "$1/boot/grub/"`,
	`chroot "$1" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -p '(,msdos1)/boot/grub' biosdisk part_msdos ext2`,
}

func (b *builder) baseImage(ctx context.Context) error {
	if !b.opts.BaseImage {
		return nil
	}
	return b.debian(ctx, debianAsset{
		step: "base", dir: "base-image", packages: b.opts.BaseImagePackages, hooks: baseHooks,
		outputs: map[Name]string{BaseExt4: ".ext4", BaseDisk: ".disk"},
		images:  baseImages,
	})
}

// diskOffset is where the root partition starts on the partitioned disk;
// GRUB's core image lives in the gap before it.
const diskOffset = 1 << 20

// baseImages makes both forms of the base image from its root.
func baseImages(ctx context.Context, p *progress, root string, out map[Name]string) error {
	if err := writeGrubConfig(root); err != nil {
		return err
	}
	size, err := rootfsSize(root)
	if err != nil {
		return err
	}
	p.printf("base", "root filesystem of %s", humanSize(size))
	if err := mkfsExt4(ctx, p, root, out[BaseExt4], 0, size); err != nil {
		return err
	}
	boot, err := os.ReadFile(filepath.Join(root, "usr/lib/grub/i386-pc/boot.img"))
	if err != nil {
		return fmt.Errorf("grub boot image: %w", err)
	}
	core, err := os.ReadFile(filepath.Join(root, "boot/grub/i386-pc/core.img"))
	if err != nil {
		return fmt.Errorf("grub core image: %w", err)
	}
	mbr, err := bootSectors(boot, core, diskOffset/512, size/512)
	if err != nil {
		return err
	}
	if err := os.WriteFile(out[BaseDisk], mbr, 0o644); err != nil {
		return err
	}
	return mkfsExt4(ctx, p, root, out[BaseDisk], diskOffset, size)
}

// writeGrubConfig boots the image's kernel on the serial console and the
// screen, with the root found by label.
func writeGrubConfig(root string) error {
	kernels, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		return fmt.Errorf("base image: want one kernel in /boot, found %d", len(kernels))
	}
	release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
	cfg := fmt.Sprintf(`serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry 'Debian' {
	linux /boot/vmlinuz-%[1]s root=LABEL=%[2]s ro console=tty0 console=ttyS0,115200
	initrd /boot/initrd.img-%[1]s
}
`, release, rootLabel)
	if _, err := os.Stat(filepath.Join(root, "boot", "initrd.img-"+release)); err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	return os.WriteFile(filepath.Join(root, "boot/grub/grub.cfg"), []byte(cfg), 0o644)
}

// rootfsSize is the size of the filesystem to make for the tree at root:
// its content, a third more for metadata and growth, and 256 MiB free,
// in whole MiB.
func rootfsSize(root string) (int64, error) {
	var total int64
	err := filepath.WalkDir(root, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		total += 4096 // an inode and a directory entry, roughly
		if d.Type().IsRegular() {
			info, err := d.Info()
			if err != nil {
				return err
			}
			total += (info.Size() + 4095) / 4096 * 4096
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	size := total*4/3 + 256<<20
	return (size + 1<<20 - 1) / (1 << 20) * (1 << 20), nil
}

// mkfsExt4 makes an ext4 filesystem of size bytes holding the tree at
// root, at offset in file, without mounting anything.
func mkfsExt4(ctx context.Context, p *progress, root, file string, offset, size int64) error {
	args := []string{"-q", "-F", "-t", "ext4", "-L", rootLabel, "-d", root, "-E", fmt.Sprintf("root_owner=0:0,offset=%d", offset), file, fmt.Sprintf("%dk", size/1024)}
	return p.run(ctx, "base", "mkfs.ext4", args...)
}

// bootSectors returns the first sectors of a disk that boots with GRUB
// from BIOS: the MBR (boot.img's code, told where the core image is, and
// a partition table with one bootable Linux partition of sectors sectors
// at start), then GRUB's core image from sector 1, in the gap before the
// partition.
func bootSectors(bootImg, coreImg []byte, start, sectors int64) ([]byte, error) {
	if len(bootImg) != 512 {
		return nil, fmt.Errorf("grub boot.img is %d bytes, want 512", len(bootImg))
	}
	if int64(len(coreImg)) > (start-1)*512 {
		return nil, fmt.Errorf("grub core.img (%d bytes) does not fit before sector %d", len(coreImg), start)
	}
	if start+sectors > 1<<32 {
		return nil, errors.New("disk too large for an MBR partition table")
	}
	out := make([]byte, 512+len(coreImg))
	copy(out, bootImg[:440]) // the code; the rest of the sector is the partition table
	// GRUB_BOOT_MACHINE_KERNEL_SECTOR: where boot.img loads the core from.
	binary.LittleEndian.PutUint64(out[0x5c:], 1)
	binary.LittleEndian.PutUint32(out[440:], 0xa1e9f00d) // disk signature
	entry := out[446:462]
	entry[0] = 0x80                            // bootable
	copy(entry[1:4], []byte{0xfe, 0xff, 0xff}) // CHS: use the LBA fields
	entry[4] = 0x83                            // Linux
	copy(entry[5:8], []byte{0xfe, 0xff, 0xff})
	binary.LittleEndian.PutUint32(entry[8:], uint32(start))
	binary.LittleEndian.PutUint32(entry[12:], uint32(sectors))
	out[510], out[511] = 0x55, 0xaa
	copy(out[512:], coreImg)
	return out, nil
}
