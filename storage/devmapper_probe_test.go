package storage

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// fakeDeviceMapper opens every path as open says and finds every tool.
func fakeDeviceMapper(open func(path string) (*os.File, error)) deviceMapperHost {
	return deviceMapperHost{open: open, lookPath: func(f string) (string, error) { return "/usr/sbin/" + f, nil }}
}

func openFails(err error) func(string) (*os.File, error) {
	return func(path string) (*os.File, error) {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
}

// The probe says no for each way the host can fall short, and why; a
// control node that exists without a driver behind it is one of them.
func TestDeviceMapperProbeNegative(t *testing.T) {
	regular := filepath.Join(t.TempDir(), "control")
	os.WriteFile(regular, nil, 0o600)
	for _, tc := range []struct {
		name string
		open func(string) (*os.File, error)
		want string
	}{
		{"no control node", openFails(syscall.ENOENT), "no /dev/mapper/control"},
		{"control node without a driver", openFails(syscall.ENODEV), "no device-mapper driver behind it"},
		{"control node of no device", openFails(syscall.ENXIO), "no device-mapper driver behind it"},
		{"control node not openable", openFails(syscall.EACCES), "cannot open"},
		{"control node that is no device-mapper", func(string) (*os.File, error) { return os.Open(regular) }, "does not answer"},
	} {
		ok, why := fakeDeviceMapper(tc.open).probe()
		if ok || !strings.Contains(why, tc.want) {
			t.Errorf("%s: %v, %q", tc.name, ok, why)
		}
	}
}

// On this host the probe and the disk code agree with what a real
// device-mapper snapshot needs.
func TestHasDeviceMapperHere(t *testing.T) {
	ok, why := HasDeviceMapper()
	t.Logf("device-mapper here: %v (%s)", ok, why)
	f, err := os.OpenFile(deviceMapperControl, os.O_RDWR, 0)
	if err == nil {
		f.Close()
	}
	if ok && err != nil {
		t.Errorf("the probe says yes but %s does not open: %v", deviceMapperControl, err)
	}
	if errors.Is(err, syscall.ENODEV) && ok {
		t.Error("a control node without a driver counts as device-mapper")
	}
}

// A device-mapper control node made on a host, as a container's /dev or a
// leftover of another kernel would have it: on a kernel without the
// driver, opening it fails with ENODEV and the probe says no.
func TestDeviceMapperProbeControlNodeWithoutDriver(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mknod needs root")
	}
	node := filepath.Join(t.TempDir(), "control")
	// misc device 10:236 is device-mapper's control.
	if err := syscall.Mknod(node, syscall.S_IFCHR|0o600, 10<<8|236); err != nil {
		t.Skipf("mknod: %v", err)
	}
	f, err := os.OpenFile(node, os.O_RDWR, 0)
	if err == nil {
		f.Close()
		t.Skip("this kernel has device-mapper: the node opens")
	}
	if !errors.Is(err, syscall.ENODEV) {
		t.Skipf("opening the node fails otherwise: %v", err)
	}
	h := fakeDeviceMapper(func(string) (*os.File, error) { return os.OpenFile(node, os.O_RDWR, 0) })
	if ok, why := h.probe(); ok || !strings.Contains(why, "no device-mapper driver") {
		t.Errorf("%v, %q", ok, why)
	}
}
