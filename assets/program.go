package assets

import (
	"errors"
	"fmt"
)

// ProgramKernel is what program VMs boot: the kernel as a bzImage (QEMU)
// and as an uncompressed vmlinux (Firecracker), and the initramfs with
// alephvm-init.
type ProgramKernel struct {
	BzImage string
	Vmlinux string
	Initrd  string
}

// FindProgramKernel completes set, the files the node's settings name
// (LINUX_PATH, LINUX_VMLINUX_PATH, INITRD_PATH), with those built in the
// assets directory dir. The error says what is still missing; the files
// found are returned with it.
func FindProgramKernel(dir string, set ProgramKernel) (ProgramKernel, error) {
	k := set
	if k.BzImage != "" && k.Vmlinux != "" && k.Initrd != "" {
		return k, nil
	}
	m, err := Load(dir)
	if err != nil {
		return k, fmt.Errorf("no guest kernel and initramfs: %w", err)
	}
	var errs []error
	for _, f := range []struct {
		path *string
		name Name
	}{{&k.BzImage, KernelBzImage}, {&k.Vmlinux, KernelVmlinux}, {&k.Initrd, Initramfs}} {
		if *f.path != "" {
			continue
		}
		if *f.path, err = m.Path(f.name); err != nil {
			errs = append(errs, err)
		}
	}
	return k, errors.Join(errs...)
}
