package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// bootInstance boots an instance's own root filesystem (root=/dev/vdX on
// the kernel command line, ext4, read-write unless ro is given) and hands
// over to its /sbin/init. It returns only on failure.
func bootInstance(loader *moduleLoader, root string, readOnly bool) error {
	if !strings.HasPrefix(root, "/dev/") {
		return fmt.Errorf("root=%s: want a device path such as /dev/vda", root)
	}
	if err := loader.load("ext4"); err != nil {
		return err
	}
	// The block device node appears once its driver has probed it.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(root); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("root device: %w", err)
		}
	}
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return err
	}
	var flags uintptr
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if err := mount(root, newRoot, "ext4", flags, ""); err != nil {
		return err
	}
	if err := switchRoot(newRoot); err != nil {
		return err
	}
	logf("handing over to /sbin/init of %s", root)
	return syscall.Exec("/sbin/init", []string{"/sbin/init"}, os.Environ())
}
