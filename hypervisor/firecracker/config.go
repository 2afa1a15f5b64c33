// Package firecracker runs VMs with Firecracker: the VM's whole
// configuration is generated as a Firecracker config file (checked against
// the v1.16.1 API spec in the tests), which boots the VM by itself; a thin
// client of the API socket does what the file cannot (ctrl-alt-del, pause,
// resume). Each Firecracker runs through the jailer in a jail laid out by
// PlanJail, and is held by a pidfd so that it is found again after a node
// restart. DialVsock is the host end of the guest's vsock.
package firecracker

import (
	"errors"
	"fmt"
	"strings"

	"github.com/alephvm/alephvm/hypervisor"
)

// Version is the Firecracker release this package targets.
const Version = "v1.16.1"

// GuestCID is the guest's vsock context id; each VM has its own vsock
// device, so every guest can use the same one.
const GuestCID = 3

// Config is Firecracker's FullVmConfiguration, as far as the node uses it.
type Config struct {
	BootSource        BootSource         `json:"boot-source"`
	Drives            []Drive            `json:"drives"`
	MachineConfig     MachineConfig      `json:"machine-config"`
	NetworkInterfaces []NetworkInterface `json:"network-interfaces"`
	Vsock             *Vsock             `json:"vsock,omitempty"`
	Logger            *Logger            `json:"logger,omitempty"`
	Metrics           *Metrics           `json:"metrics,omitempty"`
	Entropy           *Entropy           `json:"entropy,omitempty"`
}

// BootSource is the kernel and its command line.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

// Drive is a virtio block device.
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
	CacheType    string `json:"cache_type,omitempty"`
	IOEngine     string `json:"io_engine,omitempty"`
}

// MachineConfig sizes the VM.
type MachineConfig struct {
	VCPUCount  int  `json:"vcpu_count"`
	MemSizeMiB int  `json:"mem_size_mib"`
	SMT        bool `json:"smt"`
}

// NetworkInterface is a virtio-net device on a tap.
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

// Vsock is the VM's vsock device, whose host end is a unix socket.
type Vsock struct {
	GuestCID int    `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// Logger is where Firecracker writes its own log.
type Logger struct {
	LogPath       string `json:"log_path"`
	Level         string `json:"level"`
	ShowLevel     bool   `json:"show_level"`
	ShowLogOrigin bool   `json:"show_log_origin"`
}

// Metrics is where Firecracker flushes its metrics.
type Metrics struct {
	MetricsPath string `json:"metrics_path"`
}

// Entropy is a virtio-rng device.
type Entropy struct{}

// Paths name, as Firecracker sees them (inside the jail when jailed), the
// files of one VM that the node makes.
type Paths struct {
	// Path maps a host path of the spec (kernel, initrd, drives) to the path
	// Firecracker opens.
	Path        func(hostPath string) string
	VsockSocket string
	LogFile     string
	MetricsFile string
}

// bootArgs are added to every guest's command line, since boot_args
// replaces Firecracker's defaults: reboot through the keyboard controller
// (Firecracker's only way out), no waiting on a panic, and no probing the
// i8042 for what Firecracker's has not (tens of ms of boot); the i8042
// itself must stay, it carries ctrl-alt-del. Firecracker adds pci=off by
// itself. Its nomodule and 8250.nr_uarts=0 are left out: Debian kernels
// load virtio as modules, and the serial console is the console log.
const bootArgs = "reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

// BuildConfig turns a VM spec into Firecracker's configuration.
func BuildConfig(spec hypervisor.Spec, p Paths) (Config, error) {
	if err := spec.Validate(); err != nil {
		return Config{}, fmt.Errorf("vm %s: %w", spec.Name, err)
	}
	var errs []error
	if spec.Boot.Kernel == "" {
		errs = append(errs, errors.New("firecracker boots only a kernel given directly (vmlinux)"))
	}
	if spec.VCPUs > 32 {
		errs = append(errs, fmt.Errorf("firecracker runs at most 32 vCPUs, got %d", spec.VCPUs))
	}
	for i, d := range spec.Drives {
		if d.Format == "qcow2" {
			errs = append(errs, fmt.Errorf("drive %d: firecracker reads raw images only, not qcow2", i))
		}
	}
	if len(errs) > 0 {
		return Config{}, fmt.Errorf("vm %s: %w", spec.Name, errors.Join(errs...))
	}
	path := p.Path
	if path == nil {
		path = func(s string) string { return s }
	}
	args := strings.TrimSpace(spec.Boot.Cmdline + " " + bootArgs)
	c := Config{
		BootSource:        BootSource{KernelImagePath: path(spec.Boot.Kernel), BootArgs: args},
		MachineConfig:     MachineConfig{VCPUCount: spec.VCPUs, MemSizeMiB: spec.MemoryMiB},
		Drives:            []Drive{},
		NetworkInterfaces: []NetworkInterface{},
		Entropy:           &Entropy{},
	}
	if spec.Boot.Initrd != "" {
		c.BootSource.InitrdPath = path(spec.Boot.Initrd)
	}
	for i, d := range spec.Drives {
		// Firecracker shows no serial to the guest: drives keep the
		// spec's order, which is what the guest goes by.
		c.Drives = append(c.Drives, Drive{
			DriveID:    fmt.Sprintf("drive%d", i),
			PathOnHost: path(d.Path),
			IsReadOnly: d.ReadOnly,
			CacheType:  "Writeback",
			IOEngine:   "Sync",
		})
	}
	for i, n := range spec.NICs {
		c.NetworkInterfaces = append(c.NetworkInterfaces, NetworkInterface{
			IfaceID: fmt.Sprintf("eth%d", i), HostDevName: n.Tap, GuestMAC: n.MAC.String(),
		})
	}
	if spec.Control {
		c.Vsock = &Vsock{GuestCID: GuestCID, UDSPath: p.VsockSocket}
	}
	if p.LogFile != "" {
		c.Logger = &Logger{LogPath: p.LogFile, Level: "Warning", ShowLevel: true}
	}
	if p.MetricsFile != "" {
		c.Metrics = &Metrics{MetricsPath: p.MetricsFile}
	}
	return c, nil
}
