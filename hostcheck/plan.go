package hostcheck

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/storage"
)

// The hypervisors.
const (
	QEMU        = hypervisor.QEMU
	Firecracker = hypervisor.Firecracker
)

// firecrackerMinor is the Firecracker release line the node's config
// files are for.
var firecrackerMinor = minor(firecracker.Version)

// Settings are the node settings the decisions read (package config).
type Settings struct {
	Hypervisors       []string // allowed; empty allows both
	ProgramHypervisor string   // auto, firecracker or qemu
	InstanceDefault   string   // for instances whose message names none
	UseJailer         bool
	QEMURunAs         string // QEMU_RUNAS: empty for a uid per VM, root, or a user
	QEMUFirstUID      int
}

// Backend says whether a hypervisor can run VMs here, and why.
type Backend struct {
	Usable bool
	Why    string
}

// Choice is the hypervisor chosen for a kind of VM, or the error a
// message of that kind gets.
type Choice struct {
	Hypervisor string // empty when none can run it
	Why        string
	Err        error
}

// Plan is what the node will do on this host.
type Plan struct {
	Firecracker Backend
	QEMU        Backend
	// Accel is QEMU's accelerator: kvm where KVM runs ordinary guests,
	// else tcg (emulation, several times slower).
	Accel string
	// QEMURunsAs says who QEMU processes run as once they have opened
	// their files (they always run under QEMU's seccomp sandbox).
	QEMURunsAs string
	Programs   Choice
	Instances  Choice // of an instance whose message names no hypervisor
	// UEFI says whether instances of UEFI disk images (the base image's
	// debian-12 form) can boot: under QEMU, with its firmware.
	UEFI Backend
	// RawDisks is how Firecracker instances' root disks are made.
	RawDisks    storage.RawDiskMethod
	RawDisksWhy string
	// Problems stop every VM whatever its hypervisor (no tun, no
	// nftables).
	Problems []string
	settings Settings
}

// ErrUnavailable is wrapped by the errors of messages that ask for a
// hypervisor this node will not or cannot run.
var ErrUnavailable = errors.New("hypervisor unavailable")

// Decide turns what the probes found and the settings into the plan.
func Decide(h Host, s Settings) Plan {
	p := Plan{settings: s, Accel: "tcg"}
	if h.KVM.OK {
		p.Accel = "kvm"
	}
	p.Firecracker = firecrackerBackend(h, s)
	runsAs, runAsErr := qemu.Describe(s.QEMURunAs, s.QEMUFirstUID)
	p.QEMURunsAs = runsAs
	switch {
	case !p.allowed(QEMU):
		p.QEMU = Backend{Why: "not in HYPERVISORS"}
	case !h.QEMU.OK:
		p.QEMU = Backend{Why: "no qemu-system-x86_64"}
	case runAsErr != nil:
		p.QEMU = Backend{Why: "QEMU_RUNAS: " + runAsErr.Error()}
	case p.Accel == "kvm":
		p.QEMU = Backend{Usable: true, Why: "with KVM"}
	default:
		p.QEMU = Backend{Usable: true, Why: "with TCG emulation (slow): no KVM that runs ordinary guests"}
	}
	p.Programs = p.program()
	p.Instances = p.instance("")
	switch {
	case !p.QEMU.Usable:
		p.UEFI = Backend{Why: "they boot under QEMU, which cannot run here"}
	case !h.Firmware.OK:
		p.UEFI = Backend{Why: h.Firmware.Found}
	default:
		p.UEFI = Backend{Usable: true, Why: "under QEMU with " + h.Firmware.Found}
	}
	p.RawDisks = storage.ChooseRawDiskMethod(h.DeviceMapper.OK, h.Reflink.OK)
	switch p.RawDisks {
	case storage.DeviceMapper:
		p.RawDisksWhy = "device-mapper snapshots of their base"
	case storage.ReflinkCopy:
		p.RawDisksWhy = "reflink copies of their base (no device-mapper; the data directory has reflinks)"
	default:
		p.RawDisksWhy = "full copies of their base, slow and as large as it (no device-mapper, no reflinks in the data directory)"
	}
	if !h.Tun.OK {
		p.Problems = append(p.Problems, "no tap devices for VMs (tun)")
	}
	if !h.NFTables.OK {
		p.Problems = append(p.Problems, "no firewall, NAT or port forwards for VMs (nftables)")
	}
	return p
}

func firecrackerBackend(h Host, s Settings) Backend {
	var why []string
	if !allowed(s, Firecracker) {
		why = append(why, "not in HYPERVISORS")
	}
	if !h.KVM.OK {
		why = append(why, "no KVM that runs ordinary guests")
	}
	if !h.Firecracker.OK {
		why = append(why, "no firecracker binary of "+firecrackerMinor)
	}
	if !h.Vsock.OK {
		why = append(why, "no sockets for its VMs ("+h.Vsock.Found+")")
	}
	if s.UseJailer && !h.Jailer.OK {
		why = append(why, "no jailer binary of "+firecrackerMinor+" (USE_JAILER is on)")
	}
	if s.UseJailer && !h.Cgroups.OK {
		why = append(why, "no cpu and memory cgroup controllers for the jailer (USE_JAILER is on)")
	}
	if len(why) > 0 {
		return Backend{Why: strings.Join(why, ", ")}
	}
	if !s.UseJailer {
		return Backend{Usable: true, Why: "unjailed (USE_JAILER is off: for development only)"}
	}
	return Backend{Usable: true, Why: "jailed"}
}

func allowed(s Settings, hv string) bool {
	return len(s.Hypervisors) == 0 || slices.Contains(s.Hypervisors, hv)
}

func (p Plan) allowed(hv string) bool { return allowed(p.settings, hv) }

func (p Plan) backend(hv string) Backend {
	if hv == Firecracker {
		return p.Firecracker
	}
	return p.QEMU
}

// program chooses the hypervisor of programs: PROGRAM_HYPERVISOR, where
// auto is Firecracker when it can run here and QEMU otherwise.
func (p Plan) program() Choice {
	if want := p.settings.ProgramHypervisor; want == QEMU || want == Firecracker {
		if b := p.backend(want); !b.Usable {
			return Choice{Err: fmt.Errorf("%w: programs run under %s (PROGRAM_HYPERVISOR), which cannot run here: %s", ErrUnavailable, want, b.Why)}
		}
		return Choice{Hypervisor: want, Why: "PROGRAM_HYPERVISOR=" + want}
	}
	switch {
	case p.Firecracker.Usable:
		return Choice{Hypervisor: Firecracker, Why: "firecracker runs here"}
	case p.QEMU.Usable:
		return Choice{Hypervisor: QEMU, Why: "firecracker cannot run here: " + p.Firecracker.Why}
	}
	return Choice{Err: fmt.Errorf("%w: no hypervisor can run programs here: firecracker: %s; qemu: %s", ErrUnavailable, p.Firecracker.Why, p.QEMU.Why)}
}

// instance chooses the hypervisor of an instance whose message asks for
// asked (environment.hypervisor; empty: INSTANCE_DEFAULT_HYPERVISOR).
func (p Plan) instance(asked string) Choice {
	hv, why := asked, "the message asks for it"
	if hv == "" {
		hv, why = p.settings.InstanceDefault, "INSTANCE_DEFAULT_HYPERVISOR="+p.settings.InstanceDefault
	}
	if hv != QEMU && hv != Firecracker {
		return Choice{Err: fmt.Errorf("%w: unknown hypervisor %q", ErrUnavailable, hv)}
	}
	if b := p.backend(hv); !b.Usable {
		return Choice{Err: fmt.Errorf("%w: the instance needs %s (%s), which this node cannot run: %s", ErrUnavailable, hv, why, b.Why)}
	}
	return Choice{Hypervisor: hv, Why: why}
}

// ForProgram returns the hypervisor of programs, or why none runs them.
func (p Plan) ForProgram() (string, error) { return p.Programs.Hypervisor, p.Programs.Err }

// ForInstance returns the hypervisor of an instance whose message asks
// for asked (empty when it names none), or an error wrapping
// ErrUnavailable that says why this node cannot run it.
func (p Plan) ForInstance(asked string) (string, error) {
	c := p.instance(asked)
	return c.Hypervisor, c.Err
}
