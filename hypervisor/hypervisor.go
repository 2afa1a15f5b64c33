// Package hypervisor holds what every hypervisor backend is asked to run:
// the description of one VM (Spec), independent of QEMU or Firecracker.
// The backends live in the subpackages; the execution code consumes them
// through the small interfaces it defines.
package hypervisor

import (
	"errors"
	"fmt"
	"net"
	"strings"
)

// The hypervisors, by the names messages, settings and records use.
const (
	QEMU        = "qemu"
	Firecracker = "firecracker"
)

// Spec describes one VM.
type Spec struct {
	// Name identifies the VM in logs and process listings.
	Name string
	// Dir is the VM's runtime directory, which must exist: the backend keeps
	// its sockets, pidfile and console log there. Keep it short: unix socket
	// paths are limited to 107 bytes.
	Dir       string
	VCPUs     int
	MemoryMiB int
	// Boot says how the guest starts: a kernel given directly, or the first
	// drive's own bootloader when Kernel is empty.
	Boot Boot
	// Drives are attached in order: the guest sees them as vda, vdb, ...
	Drives []Drive
	NICs   []NIC
	// Control attaches the guest control channel (a virtio-serial port
	// named ControlPort under QEMU, vsock under Firecracker).
	Control     bool
	ControlPort string
	// GuestAgent attaches a channel for the guest's qemu-guest-agent (a
	// virtio-serial port named org.qemu.guest_agent.0 under QEMU), through
	// which the node freezes the guest's filesystems for a backup. The
	// Firecracker backend has no such channel and ignores it.
	GuestAgent bool
	// RebootExits makes a guest reboot end the VM, as programs want; an
	// instance reboots inside the hypervisor.
	RebootExits bool
	// Memory, when set, backs the guest's RAM with a file (QEMU only).
	Memory *Memory
	// Incoming is a file of saved VM state (a template's): the VM starts
	// from it instead of booting (QEMU only).
	Incoming string
	// FixedSlots puts every device on a fixed PCI slot, so that a template
	// and the VMs restored from it agree: the template's own devices on
	// low slots, drives and NICs (a template has none) on slots after them,
	// where a restored guest finds them by rescanning its bus. It also adds
	// a VM generation ID device, new for each VM (QEMU only).
	FixedSlots bool
}

// Memory is a file behind a guest's RAM.
type Memory struct {
	Path string
	// Shared writes the guest's RAM into the file (a template being
	// built); otherwise the file is mapped copy-on-write (the template's
	// RAM under a restored VM: its pages are shared until written).
	Shared bool
}

// The limits of FixedSlots.
const (
	MaxFixedSlotDrives = 16
	MaxFixedSlotNICs   = 4
)

// Boot is how a VM boots.
type Boot struct {
	Kernel  string // kernel image (bzImage for QEMU, vmlinux for Firecracker)
	Initrd  string
	Cmdline string
	// UEFI firmware for a disk that boots by itself: the code (read-only)
	// and the VM's own copy of the variable store. Empty means BIOS.
	FirmwareCode string
	FirmwareVars string
}

// Drive is a block device given to the guest.
type Drive struct {
	Path   string
	Format string // "raw" or "qcow2"; empty means raw
	// Backing is the chain under a qcow2 drive, nearest first, each
	// opened read-only with its own format: the backends open exactly
	// these, never a backing file named in an image's header. Empty means
	// the drive stands alone.
	Backing  []Layer
	ReadOnly bool
	// Serial is shown to the guest where the hypervisor supports it
	// (/sys/block/vdX/serial under QEMU); at most 20 bytes.
	Serial string
}

// Layer is one image of a drive's backing chain.
type Layer struct {
	Path   string
	Format string // "raw" or "qcow2"
}

// NIC is a network interface backed by a tap device on the host.
type NIC struct {
	Tap string
	MAC net.HardwareAddr
}

// Validate checks a spec before a backend turns it into a command line.
func (s Spec) Validate() error {
	var errs []error
	if s.Name == "" || strings.ContainsAny(s.Name, ",= \n") {
		errs = append(errs, fmt.Errorf("name %q: must be non-empty, without commas, equals signs or spaces", s.Name))
	}
	if !strings.HasPrefix(s.Dir, "/") {
		errs = append(errs, fmt.Errorf("runtime directory %q: must be an absolute path", s.Dir))
	}
	if s.VCPUs < 1 {
		errs = append(errs, fmt.Errorf("vcpus: must be at least 1, got %d", s.VCPUs))
	}
	if s.MemoryMiB < 16 {
		errs = append(errs, fmt.Errorf("memory: must be at least 16 MiB, got %d", s.MemoryMiB))
	}
	if s.Boot.Kernel == "" && len(s.Drives) == 0 {
		errs = append(errs, errors.New("boot: no kernel and no drive to boot from"))
	}
	for i, d := range s.Drives {
		if d.Path == "" {
			errs = append(errs, fmt.Errorf("drive %d: no path", i))
		}
		if d.Format != "" && d.Format != "raw" && d.Format != "qcow2" {
			errs = append(errs, fmt.Errorf("drive %d: format must be raw or qcow2, got %q", i, d.Format))
		}
		if len(d.Backing) > 0 && d.Format != "qcow2" {
			errs = append(errs, fmt.Errorf("drive %d: only a qcow2 drive has a backing chain, not a %q one", i, d.Format))
		}
		for j, l := range d.Backing {
			switch {
			case l.Path == "":
				errs = append(errs, fmt.Errorf("drive %d: backing layer %d: no path", i, j))
			case l.Format != "raw" && l.Format != "qcow2":
				errs = append(errs, fmt.Errorf("drive %d: backing layer %d: format must be raw or qcow2, got %q", i, j, l.Format))
			case l.Format == "raw" && j != len(d.Backing)-1:
				errs = append(errs, fmt.Errorf("drive %d: backing layer %d: a raw layer has nothing under it, it must be the last", i, j))
			}
		}
		if len(d.Serial) > 20 {
			errs = append(errs, fmt.Errorf("drive %d: serial %q is longer than 20 bytes", i, d.Serial))
		}
	}
	for i, n := range s.NICs {
		if n.Tap == "" || len(n.Tap) > 15 {
			errs = append(errs, fmt.Errorf("nic %d: tap name %q must have 1 to 15 bytes", i, n.Tap))
		}
		if len(n.MAC) != 6 {
			errs = append(errs, fmt.Errorf("nic %d: MAC address %q is not a 6-byte address", i, n.MAC))
		}
	}
	if (s.Boot.FirmwareCode == "") != (s.Boot.FirmwareVars == "") {
		errs = append(errs, errors.New("boot: UEFI firmware needs both its code and its variable store"))
	}
	if s.FixedSlots && (len(s.Drives) > MaxFixedSlotDrives || len(s.NICs) > MaxFixedSlotNICs) {
		errs = append(errs, fmt.Errorf("fixed slots: at most %d drives and %d NICs, got %d and %d", MaxFixedSlotDrives, MaxFixedSlotNICs, len(s.Drives), len(s.NICs)))
	}
	if s.Memory != nil && !strings.HasPrefix(s.Memory.Path, "/") {
		errs = append(errs, fmt.Errorf("memory file %q: must be an absolute path", s.Memory.Path))
	}
	if s.Incoming != "" && (s.Memory == nil || !s.FixedSlots) {
		errs = append(errs, errors.New("incoming state: needs the template's memory and fixed slots"))
	}
	if s.Control && s.ControlPort == "" {
		errs = append(errs, errors.New("control: the channel needs a port name"))
	}
	return errors.Join(errs...)
}
