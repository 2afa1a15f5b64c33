package storage

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The files a device-mapper snapshot needs: the device-mapper's control
// node (dmsetup talks to the driver through it) and the loop devices'
// (losetup --find asks it for a free one).
const (
	deviceMapperControl = "/dev/mapper/control"
	loopControl         = "/dev/loop-control"
)

// snapshotTargets are the device-mapper targets createSnapshot's tables
// use.
var snapshotTargets = []string{"linear", "zero", "snapshot"}

// deviceMapperHost is what the device-mapper probe calls on the host; the
// tests fake it.
type deviceMapperHost struct {
	open     func(path string) (*os.File, error)
	lookPath func(file string) (string, error)
}

var realDeviceMapperHost = deviceMapperHost{
	open:     func(path string) (*os.File, error) { return os.OpenFile(path, os.O_RDWR, 0) },
	lookPath: exec.LookPath,
}

// HasDeviceMapper reports whether device-mapper snapshots can be made
// here, as CreateRawDisk makes them: the kernel's device-mapper driver
// answers on its control node and has (or loads) the targets the
// snapshot's tables use, loop devices can be had, and the dmsetup and
// losetup tools are installed. A control node whose driver is missing
// (ENODEV on open, as on a kernel without device-mapper) is a no.
func HasDeviceMapper() (bool, string) { return realDeviceMapperHost.probe() }

func (h deviceMapperHost) probe() (bool, string) {
	f, err := h.open(deviceMapperControl)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false, "no " + deviceMapperControl + ": the kernel has no device-mapper (modprobe dm_mod)"
	case errors.Is(err, unix.ENODEV), errors.Is(err, unix.ENXIO):
		return false, deviceMapperControl + " exists but the kernel has no device-mapper driver behind it (modprobe dm_mod)"
	case err != nil:
		return false, fmt.Sprintf("cannot open %s: %v", deviceMapperControl, err)
	}
	defer f.Close()
	version, err := dmIoctl(f, unix.DM_VERSION, "")
	if err != nil {
		return false, fmt.Sprintf("the device-mapper driver does not answer on %s: %v", deviceMapperControl, err)
	}
	for _, target := range snapshotTargets {
		// The driver loads a target's module when asked for it, as it does
		// when a table names it. Kernels before 5.3 know no such request
		// (ENOTTY): their targets are found when the disk is made.
		if _, err := dmIoctl(f, unix.DM_GET_TARGET_VERSION, target); err != nil && !errors.Is(err, unix.ENOTTY) {
			return false, fmt.Sprintf("the device-mapper driver has no %s target (modprobe dm_snapshot): %v", target, err)
		}
	}
	loop, err := h.open(loopControl)
	if err != nil {
		return false, fmt.Sprintf("no loop devices: %v (modprobe loop)", err)
	}
	loop.Close()
	for _, tool := range []string{"dmsetup", "losetup"} {
		if _, err := h.lookPath(tool); err != nil {
			return false, tool + " is not installed (Debian: dmsetup, mount)"
		}
	}
	return true, "device-mapper driver " + version + " with the snapshot targets, loop devices, dmsetup and losetup"
}

// dmBuffer is a device-mapper ioctl's argument: its header and room for
// what the driver writes after it.
type dmBuffer struct {
	unix.DmIoctl
	data [1024]byte
}

// dmIoctl sends one device-mapper request naming name and returns the
// driver's interface version.
func dmIoctl(f *os.File, req uint, name string) (string, error) {
	var b dmBuffer
	b.Version = [3]uint32{4, 0, 0} // the interface major version this speaks
	b.Data_size = uint32(unsafe.Sizeof(b))
	b.Data_start = uint32(unsafe.Sizeof(b.DmIoctl))
	if len(name) >= len(b.Name) {
		return "", fmt.Errorf("device-mapper name %q is too long", name)
	}
	copy(b.Name[:], name)
	conn, err := f.SyscallConn()
	if err != nil {
		return "", err
	}
	var errno unix.Errno
	if err := conn.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), uintptr(unsafe.Pointer(&b)))
	}); err != nil {
		return "", err
	}
	if errno != 0 {
		return "", errno
	}
	return fmt.Sprintf("%d.%d.%d", b.Version[0], b.Version[1], b.Version[2]), nil
}
