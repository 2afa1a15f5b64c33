package guest

import (
	"bufio"
	"fmt"
	"io"
	"strings"
)

// InitModules are the kernel modules the initramfs carries for the init
// (Debian builds them as modules); their dependencies come with them. The
// init loads only those its devices need: the virtio transports whose
// devices are present, then a driver per virtio device type, then the
// filesystems.
var InitModules = []string{
	"virtio_pci",                 // QEMU's virtio devices
	"virtio_mmio",                // Firecracker's virtio devices
	"virtio_blk",                 // drives
	"virtio_net",                 // eth0
	"virtio_console",             // the control port under QEMU
	"vmw_vsock_virtio_transport", // the control port under Firecracker
	"squashfs",                   // runtime, squashfs code and immutable volumes
	"overlay",                    // the writable root
	"ext4",                       // persistent and ephemeral volumes (built in on the cloud kernel)
}

// ModuleIndexPath is where the initramfs lists its modules: one line per
// module, "name file dependency...", with file relative to the
// initramfs's root and the dependencies by name. Modules the kernel has
// built in are listed with file "-".
const ModuleIndexPath = "/lib/modules/alephvm.index"

// Module is one entry of the module index.
type Module struct {
	Name string
	File string // "" for a built-in module
	Deps []string
}

// ParseModuleIndex reads a module index.
func ParseModuleIndex(r io.Reader) (map[string]Module, error) {
	mods := map[string]Module{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if len(fields) < 2 {
			return nil, fmt.Errorf("module index line %d: want name and file", n)
		}
		m := Module{Name: fields[0], File: fields[1], Deps: fields[2:]}
		if m.File == "-" {
			m.File = ""
		}
		mods[m.Name] = m
	}
	return mods, sc.Err()
}

// FormatModuleIndex writes mods as a module index.
func FormatModuleIndex(w io.Writer, mods []Module) error {
	for _, m := range mods {
		file := m.File
		if file == "" {
			file = "-"
		}
		if _, err := fmt.Fprintln(w, strings.Join(append([]string{m.Name, file}, m.Deps...), " ")); err != nil {
			return err
		}
	}
	return nil
}
