package storage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// A raw disk is an instance's writable root disk as Firecracker reads it
// (Firecracker takes raw images only, no qcow2): a block device or file
// holding the base image's ext4 filesystem, grown to the instance's size.
// How it is made over the base depends on what the host can do; see
// RawDiskMethodFor.

// RawDiskMethod says how a raw disk is made over its base image.
type RawDiskMethod string

// The methods, from the best.
const (
	// DeviceMapper is a device-mapper snapshot of the base (the
	// reference's create_devmapper): a device whose unwritten blocks read
	// from the base, with the writes in a sparse copy-on-write file.
	DeviceMapper RawDiskMethod = "devmapper"
	// ReflinkCopy clones the base file sharing its extents (xfs, btrfs).
	ReflinkCopy RawDiskMethod = "reflink"
	// PlainCopy copies the base's bytes: slow and as large as the base,
	// the last resort.
	PlainCopy RawDiskMethod = "copy"
)

// ChooseRawDiskMethod is the rule: a device-mapper snapshot where the
// host has device-mapper, else a reflink where the filesystem has them,
// else a copy.
func ChooseRawDiskMethod(deviceMapper, reflink bool) RawDiskMethod {
	switch {
	case deviceMapper:
		return DeviceMapper
	case reflink:
		return ReflinkCopy
	}
	return PlainCopy
}

// RawDiskMethodFor says how raw disks in dir will be made, and why.
func RawDiskMethodFor(dir string) (RawDiskMethod, string) {
	dm, why := HasDeviceMapper()
	if dm {
		return DeviceMapper, why
	}
	reflink, err := SupportsReflink(dir)
	switch {
	case err != nil:
		why = fmt.Sprintf("%s; and reflinks in %s cannot be probed: %v", why, dir, err)
	case reflink:
		why = fmt.Sprintf("%s; %s supports reflinks", why, dir)
	default:
		why = fmt.Sprintf("%s; %s does not support reflinks (xfs and btrfs do)", why, dir)
	}
	return ChooseRawDiskMethod(false, reflink), why
}

// RawDisk is a raw root disk made by CreateRawDisk.
type RawDisk struct {
	Path   string // what the VM opens: the file, or the device-mapper device
	Method RawDiskMethod
	// Name is the device-mapper device's name, for Release.
	Name string
}

// CreateRawDisk makes the raw root disk of an instance in dir (its own
// directory) over parent, a bare ext4 filesystem image, sized sizeMiB with
// the filesystem grown to fill it. name names the device-mapper devices
// (letters, digits, dashes). An existing disk is kept with its data
// (instances persist on the host) and only grown; a size below the
// parent's is refused with ErrTooSmall, and one the filesystem of dir
// cannot hold with ErrNoSpace.
func (d Disks) CreateRawDisk(ctx context.Context, parent, dir, name string, sizeMiB int64, log *slog.Logger) (RawDisk, error) {
	st, err := os.Stat(parent)
	if err != nil {
		return RawDisk{}, fmt.Errorf("raw disk over %s: %w", parent, err)
	}
	size := sizeMiB << 20
	if size < st.Size() {
		return RawDisk{}, fmt.Errorf("%w: %d MiB asked, the base image %s is %d MiB", ErrTooSmall, sizeMiB, parent, st.Size()>>20)
	}
	if err := checkExt4(parent); err != nil {
		return RawDisk{}, err
	}
	// A disk made before keeps its method (its data is in that form),
	// whatever the host could do better today.
	method, why := RawDiskMethodFor(dir)
	if existing, ok := FindRawDisk(dir, name); ok {
		if existing.Method == DeviceMapper && method != DeviceMapper {
			return RawDisk{}, fmt.Errorf("raw disk in %s was made with device-mapper, which this host no longer has: %s", dir, why)
		}
		method = existing.Method
	}
	if method == DeviceMapper {
		cow := filepath.Join(dir, cowFile)
		if err := d.reserve(dir, "a disk", cowSize(size)-fileSize(cow)); err != nil {
			return RawDisk{}, err
		}
		return createSnapshot(ctx, parent, dir, name, size)
	}
	path := filepath.Join(dir, rawFile)
	// A reflink shares the parent's blocks only until the guest writes
	// them: the disk may take its whole size.
	if err := d.reserve(dir, "a disk", size-fileSize(path)); err != nil {
		return RawDisk{}, err
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		cloned, err := CloneFile(parent, path)
		if err != nil {
			return RawDisk{}, err
		}
		if cloned == FullCopy {
			log.Warn("root disk made by a full copy of its base: slow, and as large as the base", "disk", path, "why", why)
			method = PlainCopy
		} else {
			method = ReflinkCopy
		}
	} else if err != nil {
		return RawDisk{}, fmt.Errorf("raw disk %s: %w", path, err)
	}
	if err := growFile(ctx, path, size); err != nil {
		return RawDisk{}, err
	}
	return RawDisk{Path: path, Method: method}, nil
}

// The files of a raw disk in its instance's directory: the disk itself
// (reflink or plain copy), or a device-mapper snapshot's copy-on-write
// file.
const (
	rawFile = "rootfs.raw"
	cowFile = "rootfs.cow"
)

// FindRawDisk returns the raw disk CreateRawDisk made in dir under name,
// without touching it: to release it later, as after a node restart. A
// file disk's method is given as ReflinkCopy whichever copy made it.
func FindRawDisk(dir, name string) (RawDisk, bool) {
	if _, err := os.Stat(filepath.Join(dir, cowFile)); err == nil {
		return RawDisk{Path: "/dev/mapper/" + dmName(name), Method: DeviceMapper, Name: name}, true
	}
	if _, err := os.Stat(filepath.Join(dir, rawFile)); err == nil {
		return RawDisk{Path: filepath.Join(dir, rawFile), Method: ReflinkCopy}, true
	}
	return RawDisk{}, false
}

// checkExt4 refuses an image that is not a bare ext4 (or ext2/3)
// filesystem, the only kind the disk is grown for.
func checkExt4(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	magic := make([]byte, 2)
	if _, err := f.ReadAt(magic, 1024+56); err != nil || binary.LittleEndian.Uint16(magic) != 0xEF53 {
		return fmt.Errorf("base image %s is not a bare ext4 filesystem: Firecracker instances boot one as their root device", path)
	}
	return nil
}

// growFile extends the image at path to size bytes (sparsely) and its
// filesystem with it. A file already that large is left as it is.
func growFile(ctx context.Context, path string, size int64) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Size() >= size {
		return nil
	}
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("grow disk %s: %w", path, err)
	}
	return growExt4(ctx, path)
}

// growExt4 grows the ext4 filesystem on a file or block device to its
// size, after the check resize2fs insists on for a filesystem that was
// mounted since its last check.
func growExt4(ctx context.Context, dev string) error {
	if _, err := run(ctx, "e2fsck", "-f", "-p", dev); err != nil {
		// 1 means errors were fixed, which is fine before a resize.
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			return fmt.Errorf("check the filesystem of %s: %w", dev, err)
		}
	}
	if _, err := run(ctx, "resize2fs", dev); err != nil {
		return fmt.Errorf("grow the filesystem of %s: %w", dev, err)
	}
	return nil
}

// The device-mapper stack of one instance, as the reference builds it:
//
//	<name>-base  = the parent (read-only loop) followed by zeros up to the size
//	<name>       = snapshot of <name>-base, writes in rootfs.cow (a loop)
//
// The copy-on-write file is sparse and a little larger than the disk,
// for the snapshot's own metadata (one 16-byte exception per 4 KiB chunk):
// the reference's, exactly the disk's size, overflows once most chunks are
// written. It is "P"ersistent, so the instance's writes survive the
// devices being taken down and made again (after a host reboot).
func createSnapshot(ctx context.Context, parent, dir, name string, size int64) (RawDisk, error) {
	disk := RawDisk{Path: "/dev/mapper/" + dmName(name), Method: DeviceMapper, Name: name}
	// Devices left by an earlier start are made again, at today's size.
	if err := disk.Release(ctx); err != nil {
		return RawDisk{}, err
	}
	st, err := os.Stat(parent)
	if err != nil {
		return RawDisk{}, err
	}
	cow := filepath.Join(dir, cowFile)
	if err := ensureSparse(cow, cowSize(size)); err != nil {
		return RawDisk{}, err
	}
	ok := false
	defer func() {
		if !ok {
			_ = disk.Release(context.WithoutCancel(ctx))
		}
	}()
	parentLoop, err := attachLoop(ctx, parent, true)
	if err != nil {
		return RawDisk{}, err
	}
	cowLoop, err := attachLoop(ctx, cow, false)
	if err != nil {
		return RawDisk{}, err
	}
	parentSectors, sectors := st.Size()/512, size/512
	base := fmt.Sprintf("0 %d linear %s 0\n", parentSectors, parentLoop)
	if sectors > parentSectors {
		base += fmt.Sprintf("%d %d zero\n", parentSectors, sectors-parentSectors)
	}
	if err := dmCreate(ctx, dmName(name)+"-base", base); err != nil {
		return RawDisk{}, err
	}
	snapshot := fmt.Sprintf("0 %d snapshot /dev/mapper/%s-base %s P 8\n", sectors, dmName(name), cowLoop)
	if err := dmCreate(ctx, dmName(name), snapshot); err != nil {
		return RawDisk{}, err
	}
	if err := growExt4(ctx, disk.Path); err != nil {
		return RawDisk{}, err
	}
	ok = true
	return disk, nil
}

func dmName(name string) string { return "alephvm-" + name }

// cowSize is the size of the copy-on-write file of a snapshot of size
// bytes: the disk and the snapshot's metadata (see createSnapshot).
func cowSize(size int64) int64 { return size + size/128 + 1<<20 }

// fileSize is the size of the file at path, 0 when there is none.
func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

func ensureSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("copy-on-write file: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() >= size {
		return nil
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("copy-on-write file: %w", err)
	}
	return nil
}

// attachLoop gives file a loop device and returns its path.
func attachLoop(ctx context.Context, file string, readOnly bool) (string, error) {
	args := []string{"--find", "--show"}
	if readOnly {
		args = append(args, "--read-only")
	}
	out, err := run(ctx, "losetup", append(args, file)...)
	if err != nil {
		return "", fmt.Errorf("loop device for %s: %w", file, err)
	}
	return strings.TrimSpace(string(out)), nil
}

func dmCreate(ctx context.Context, name, table string) error {
	cmd := exec.CommandContext(ctx, "dmsetup", "create", name)
	cmd.Stdin = strings.NewReader(table)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("dmsetup create %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	// Without udev (in a container), dmsetup makes the /dev/mapper node.
	_, _ = run(ctx, "dmsetup", "mknodes", name)
	return nil
}

// Release takes a device-mapper disk's devices and loop devices down; its
// copy-on-write file, with the instance's data, stays. For a file disk it
// does nothing.
func (d RawDisk) Release(ctx context.Context) error {
	if d.Method != DeviceMapper {
		return nil
	}
	var loops []string
	for _, dev := range []string{dmName(d.Name), dmName(d.Name) + "-base"} {
		out, err := run(ctx, "dmsetup", "deps", "-o", "devname", dev)
		if err != nil {
			continue // not there
		}
		loops = append(loops, loopsIn(string(out))...)
		if _, err := run(ctx, "dmsetup", "remove", dev); err != nil {
			return fmt.Errorf("release disk %s: %w", d.Name, err)
		}
	}
	for _, loop := range loops {
		if _, err := run(ctx, "losetup", "-d", "/dev/"+loop); err != nil {
			return fmt.Errorf("release disk %s: %w", d.Name, err)
		}
	}
	return nil
}

// loopsIn picks the loop devices out of `dmsetup deps -o devname`:
// "2 dependencies  : (loop1) (dm-0)".
func loopsIn(deps string) []string {
	var out []string
	for _, f := range strings.Fields(deps) {
		f = strings.Trim(f, "()")
		if strings.HasPrefix(f, "loop") {
			if _, err := strconv.Atoi(f[4:]); err == nil {
				out = append(out, f)
			}
		}
	}
	return out
}
