package guest

import (
	"errors"
	"fmt"
	"net/netip"
	"path"
	"strconv"
	"strings"
)

// ConfigVersion is the version of Config this package writes and the init
// reads. An init refuses a config drive of another version.
const ConfigVersion = 1

// Config is everything the init of a program VM needs. The host writes it
// to the config drive (WriteConfigDrive); the init reads it at boot.
type Config struct {
	Version  int      `json:"version"`
	Hostname string   `json:"hostname"`
	Network  *Network `json:"network,omitempty"` // nil: no network, eth0 stays down
	Workload Workload `json:"workload"`
	// Drives are the block devices attached after the config drive, in
	// attachment order: Drives[i] is the guest's (i+2)-th virtio block
	// device, /dev/vd{b,c,...} (see DeviceName).
	Drives []Drive `json:"drives"`
	// Tmpfs are memory-backed writable mounts, such as small ephemeral
	// volumes that need no block device.
	Tmpfs []Tmpfs `json:"tmpfs,omitempty"`
	// Halt is how the init ends the VM once halted: HaltPowerOff (the
	// default, which makes QEMU exit) or HaltReboot (Firecracker exits on a
	// guest reboot with the kernel argument reboot=k).
	Halt HaltAction `json:"halt,omitempty"`
	// Debug copies the workload's output to the console too.
	Debug bool `json:"debug,omitempty"`
}

// HaltAction is how the VM ends after a halt.
type HaltAction string

// The halt actions.
const (
	HaltPowerOff HaltAction = "poweroff"
	HaltReboot   HaltAction = "reboot"
)

// Network configures the guest's network interface.
type Network struct {
	Interface string       `json:"interface,omitempty"` // default "eth0"
	Address   netip.Prefix `json:"address,omitzero"`    // IPv4 address and prefix length, 172.16.4.2/24
	Gateway   netip.Addr   `json:"gateway,omitzero"`
	Address6  netip.Prefix `json:"address6,omitzero"` // optional IPv6 address and prefix length
	Gateway6  netip.Addr   `json:"gateway6,omitzero"`
	MTU       int          `json:"mtu,omitempty"` // 0 keeps the driver's default
	DNS       []netip.Addr `json:"dns,omitempty"`
}

// Interface is how a program serves HTTP, as in the PROGRAM message.
type Interface string

// The program interfaces.
const (
	InterfaceBinary Interface = "binary" // run /opt/code/<entrypoint>, which listens on Port
	InterfaceASGI   Interface = "asgi"   // serve entrypoint "module:app" with uvicorn on Port
)

// Port is where every program serves HTTP, as in the reference.
const Port = 8080

// The workload's user is chosen by the init, never by the runtime: a
// runtime is the message owner's to make, and its /etc/passwd could map
// any name to uid 0. The workload runs as WorkloadUID and WorkloadGID (or
// Workload.User's uid and gid), named DefaultUser in its environment, with
// its home in /home/DefaultUser; uid 0 and gid 0 are refused.
const (
	DefaultUser = "aleph"
	WorkloadUID = 1000
	WorkloadGID = 1000
)

// maxID is the largest uid or gid a workload may have ((uid_t)-1 and
// (uid_t)-2 mean "none" and "overflow" to the kernel).
const maxID = 1<<32 - 3

// ParseWorkloadUser reads Workload.User: "" for WorkloadUID:WorkloadGID,
// or "uid[:gid]" in decimal (gid defaults to uid). Names are refused: they
// would be looked up in the runtime's /etc/passwd. So are uid 0 and gid 0.
func ParseWorkloadUser(spec string) (uid, gid int, err error) {
	if spec == "" {
		return WorkloadUID, WorkloadGID, nil
	}
	u, g, hasGID := strings.Cut(spec, ":")
	uid, err = parseID(u)
	if err != nil {
		return 0, 0, fmt.Errorf("workload user %q: uid: %w", spec, err)
	}
	gid = uid
	if hasGID {
		if gid, err = parseID(g); err != nil {
			return 0, 0, fmt.Errorf("workload user %q: gid: %w", spec, err)
		}
	}
	return uid, gid, nil
}

func parseID(s string) (int, error) {
	id, err := strconv.ParseUint(s, 10, 32)
	switch {
	case err != nil:
		return 0, fmt.Errorf("want a number (names are not looked up in the runtime), got %q", s)
	case id == 0:
		return 0, errors.New("0 is root's: the workload never runs as root")
	case id > maxID:
		return 0, fmt.Errorf("%d is past %d", id, maxID)
	}
	return int(id), nil
}

// Workload is the program the init starts and supervises.
type Workload struct {
	Interface Interface `json:"interface"`
	// Entrypoint is the file to run below /opt/code (binary), or
	// "module:attribute" (asgi; for plain code, the attribute of the file's
	// top-level names).
	Entrypoint string            `json:"entrypoint"`
	Args       []string          `json:"args,omitempty"`      // appended to a binary's argv
	Variables  map[string]string `json:"variables,omitempty"` // the message's variables, as environment
	// User is the unprivileged user that runs the workload: "uid[:gid]",
	// never 0 (ParseWorkloadUser). Empty means WorkloadUID:WorkloadGID.
	User string `json:"user,omitempty"`
	// Events is set for an ASGI program that subscribes to messages: the
	// init runs it under its event wrapper, which takes the messages the
	// node delivers (op "event").
	Events bool `json:"events,omitempty"`
}

// DriveRole says what a drive holds.
type DriveRole string

// The drive roles.
const (
	RoleRuntime DriveRole = "runtime" // the root filesystem, squashfs, mounted read-only under a tmpfs overlay
	RoleCode    DriveRole = "code"    // the program's code, mounted or unpacked at /opt/code
	RoleData    DriveRole = "data"    // the program's data, unpacked at (or mounted on) /data
	RoleVolume  DriveRole = "volume"  // a volume of the message, at its mount
)

// Format is what a drive's bytes are.
type Format string

// The drive formats.
const (
	FormatSquashfs Format = "squashfs" // mounted read-only
	FormatExt4     Format = "ext4"     // mounted read-write unless ReadOnly
	FormatZip      Format = "zip"      // a zip archive of Size bytes, unpacked into the mount point
	FormatFile     Format = "file"     // a single file of Size bytes (plain code), written into /opt/code
)

// Drive is one block device attached to the VM, and where the init puts
// it.
type Drive struct {
	Role     DriveRole `json:"role"`
	Format   Format    `json:"format"`
	Mount    string    `json:"mount"` // absolute path in the guest; "/" for the runtime
	ReadOnly bool      `json:"read_only,omitempty"`
	// Persistent marks a volume whose content outlives the VM; the init
	// unmounts every drive cleanly at halt either way.
	Persistent bool `json:"persistent,omitempty"`
	// Size is the length in bytes of a zip or file drive's payload (block
	// devices are padded to whole sectors).
	Size int64  `json:"size,omitempty"`
	Name string `json:"name,omitempty"` // the volume's name, for logs
}

// Tmpfs is a memory-backed writable mount.
type Tmpfs struct {
	Mount   string `json:"mount"`
	SizeMiB int    `json:"size_mib"`
}

// PlainCodeModule is the Python module an asgi program with plain encoding
// is written to, below /opt/code.
const PlainCodeModule = "alephvm_plain"

// DeviceName returns the guest device name of Drives[i]: the config drive
// is vda, so Drives[0] is vdb, Drives[24] is vdz, Drives[25] vdaa, as the
// Linux virtio block driver names them.
func DeviceName(i int) string {
	return "vd" + diskLetters(i+1)
}

// diskLetters is the kernel's sd/vd suffix for disk index n: a..z, aa..zz, ...
func diskLetters(n int) string {
	s := ""
	for n++; n > 0; n = (n - 1) / 26 {
		s = string(rune('a'+(n-1)%26)) + s
	}
	return s
}

// Validate checks what the init relies on.
func (c Config) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Version != ConfigVersion {
		add("version: want %d, got %d", ConfigVersion, c.Version)
	}
	if c.Hostname == "" || len(c.Hostname) > 64 || strings.ContainsAny(c.Hostname, " /\n\t") {
		add("hostname: must be 1 to 64 characters without spaces or slashes, got %q", c.Hostname)
	}
	switch c.Halt {
	case "", HaltPowerOff, HaltReboot:
	default:
		add("halt: must be %s or %s, got %q", HaltPowerOff, HaltReboot, c.Halt)
	}
	if n := c.Network; n != nil {
		if !n.Address.IsValid() || !n.Address.Addr().Is4() {
			add("network.address: want an IPv4 address with a prefix length, got %q", n.Address)
		}
		if n.Gateway.IsValid() && !n.Gateway.Is4() {
			add("network.gateway: want an IPv4 address, got %s", n.Gateway)
		}
		if n.Address6.IsValid() && !n.Address6.Addr().Is6() {
			add("network.address6: want an IPv6 address, got %s", n.Address6)
		}
		if n.Gateway6.IsValid() && !n.Gateway6.Is6() {
			add("network.gateway6: want an IPv6 address, got %s", n.Gateway6)
		}
		if n.MTU != 0 && (n.MTU < 576 || n.MTU > 65535) {
			add("network.mtu: must be between 576 and 65535, got %d", n.MTU)
		}
	}
	w := c.Workload
	switch w.Interface {
	case InterfaceBinary:
		if w.Entrypoint == "" || path.IsAbs(w.Entrypoint) || strings.HasPrefix(path.Clean(w.Entrypoint), "..") {
			add("workload.entrypoint: want a file path relative to /opt/code, got %q", w.Entrypoint)
		}
	case InterfaceASGI:
		if w.Entrypoint == "" {
			add("workload.entrypoint: want module:attribute")
		}
	default:
		add("workload.interface: must be %s or %s, got %q", InterfaceBinary, InterfaceASGI, w.Interface)
	}
	if _, _, err := ParseWorkloadUser(w.User); err != nil {
		add("workload.user: %v", err)
	}
	runtimes := 0
	mounts := map[string]bool{}
	for i, d := range c.Drives {
		at := fmt.Sprintf("drives[%d]", i)
		if d.Mount == "" || !path.IsAbs(d.Mount) || path.Clean(d.Mount) != d.Mount {
			add("%s.mount: want a clean absolute path, got %q", at, d.Mount)
		} else if mounts[d.Mount] {
			add("%s.mount: %s is already mounted", at, d.Mount)
		}
		mounts[d.Mount] = true
		switch d.Role {
		case RoleRuntime:
			runtimes++
			if d.Format != FormatSquashfs || d.Mount != "/" {
				add("%s: the runtime must be a squashfs mounted at /", at)
			}
		case RoleCode, RoleData, RoleVolume:
			if d.Mount == "/" {
				add("%s.mount: only the runtime is mounted at /", at)
			}
		default:
			add("%s.role: unknown role %q", at, d.Role)
		}
		switch d.Format {
		case FormatSquashfs, FormatExt4:
		case FormatZip, FormatFile:
			if d.Size <= 0 {
				add("%s.size: a %s drive needs the payload's size", at, d.Format)
			}
			if d.Format == FormatFile && d.Role != RoleCode {
				add("%s: only code comes as a single file", at)
			}
		default:
			add("%s.format: unknown format %q", at, d.Format)
		}
	}
	if runtimes != 1 {
		add("drives: want exactly one runtime drive, got %d", runtimes)
	}
	for i, t := range c.Tmpfs {
		if t.Mount == "" || !path.IsAbs(t.Mount) || path.Clean(t.Mount) != t.Mount || t.Mount == "/" {
			add("tmpfs[%d].mount: want a clean absolute path other than /, got %q", i, t.Mount)
		} else if mounts[t.Mount] {
			add("tmpfs[%d].mount: %s is already mounted", i, t.Mount)
		}
		mounts[t.Mount] = true
		if t.SizeMiB <= 0 {
			add("tmpfs[%d].size_mib: must be positive", i)
		}
	}
	return errors.Join(errs...)
}
