// Package hostcheck finds out what this host can run (KVM, Firecracker and
// its jailer, QEMU, device-mapper, reflinks, nftables, tun, cgroups) and
// decides from that and the node's settings which hypervisor runs each
// message and how Firecracker root disks are made. `alephvm doctor` prints
// it; the program launcher and the instance manager are to ask it too.
package hostcheck

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"

	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/storage"
)

// Probe is one thing looked at on the host.
type Probe struct {
	OK    bool
	Found string // what was found, for people
}

// Host is what the probes found.
type Host struct {
	KVM          Probe // runs ordinary guests, not merely present
	Firecracker  Probe // the pinned release's binary
	Jailer       Probe
	QEMU         Probe // and it accepts the node's seccomp sandbox
	DeviceMapper Probe
	Reflink      Probe // in the directory of the VMs' disks
	NFTables     Probe
	Tun          Probe
	Cgroups      Probe // the cpu and memory controllers the jailer sets
}

// Paths are where the probes look.
type Paths struct {
	Firecracker string // binary, a path or a name in PATH
	Jailer      string
	QEMU        string
	DataDir     string // where the VMs' disks are made
}

// ProbeHost looks at this host. It takes a few seconds: the KVM probe
// boots a tiny guest.
func ProbeHost(ctx context.Context, p Paths) Host {
	h := Host{
		Firecracker:  probeBinary(ctx, p.Firecracker, "Firecracker"),
		Jailer:       probeBinary(ctx, p.Jailer, "Jailer"),
		QEMU:         probeQEMU(ctx, p.QEMU),
		DeviceMapper: probeDeviceMapper(),
		Reflink:      probeReflink(p.DataDir),
		NFTables:     probeNFTables(),
		Tun:          probeTun(),
		Cgroups:      probeCgroups(),
	}
	h.KVM = probeKVM(ctx, p.QEMU, h.QEMU.OK)
	return h
}

func probeKVM(ctx context.Context, qemuBin string, haveQEMU bool) Probe {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return Probe{Found: "no /dev/kvm: the kernel has no KVM, or it is not loaded (modprobe kvm_intel or kvm_amd)"}
	}
	if !haveQEMU {
		return Probe{Found: "/dev/kvm exists, but whether it runs ordinary guests is unknown: the probe guest boots under QEMU, which is missing"}
	}
	if qemu.KVMUsable(ctx, qemuBin) {
		return Probe{OK: true, Found: "/dev/kvm runs ordinary guests (a probe guest booted under it)"}
	}
	return Probe{Found: "/dev/kvm exists but runs no ordinary guest: a probe guest failed under it (nested virtualization without the CPU features guests need?)"}
}

// probeBinary finds a Firecracker release binary (firecracker or jailer)
// and checks that it is of the pinned release's minor version.
func probeBinary(ctx context.Context, path, name string) Probe {
	bin, err := exec.LookPath(path)
	if err != nil {
		return Probe{Found: fmt.Sprintf("%q not found: Firecracker %s is not packaged by Debian; install its release binaries", path, firecracker.Version)}
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return Probe{Found: fmt.Sprintf("%s does not run: %v", bin, err)}
	}
	version, ok := parseVersion(string(out), name)
	if !ok {
		return Probe{Found: fmt.Sprintf("%s: --version says %q, not %s vX.Y.Z", bin, strings.TrimSpace(string(out)), name)}
	}
	if minor(version) != firecrackerMinor {
		return Probe{Found: fmt.Sprintf("%s is %s; this node's config files are for %s", bin, version, firecracker.Version)}
	}
	return Probe{OK: true, Found: fmt.Sprintf("%s %s", bin, version)}
}

// parseVersion reads "Firecracker v1.16.1" (or "Jailer v1.16.1") from the
// first line of --version.
func parseVersion(out, name string) (string, bool) {
	line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	fields := strings.Fields(line)
	if len(fields) != 2 || fields[0] != name || !strings.HasPrefix(fields[1], "v") {
		return "", false
	}
	return fields[1], true
}

// minor returns "v1.16" of "v1.16.1".
func minor(v string) string {
	if strings.Count(v, ".") == 2 {
		return v[:strings.LastIndex(v, ".")]
	}
	return v
}

func probeQEMU(ctx context.Context, path string) Probe {
	bin, err := exec.LookPath(path)
	if err != nil {
		return Probe{Found: fmt.Sprintf("%q not found: install Debian's qemu-system-x86", path)}
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return Probe{Found: fmt.Sprintf("%s does not run: %v", bin, err)}
	}
	line, _, _ := strings.Cut(string(out), "\n")
	// The node runs every QEMU under its seccomp sandbox: a QEMU built
	// without seccomp refuses the option.
	if out, err := exec.CommandContext(ctx, bin, "-sandbox", qemu.Sandbox(true), "-version").CombinedOutput(); err != nil {
		why, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return Probe{Found: fmt.Sprintf("%s has no seccomp sandbox (-sandbox %s): %s", bin, qemu.Sandbox(true), why)}
	}
	return Probe{OK: true, Found: fmt.Sprintf("%s: %s, with its seccomp sandbox", bin, strings.TrimSpace(line))}
}

func probeDeviceMapper() Probe {
	ok, why := storage.HasDeviceMapper()
	return Probe{OK: ok, Found: why}
}

// probeReflink probes dir, or its nearest existing parent when the node
// has not made it yet (the same filesystem, as a rule).
func probeReflink(dir string) Probe {
	probed := dir
	for {
		if _, err := os.Stat(probed); err == nil || probed == "/" {
			break
		}
		probed = filepath.Dir(probed)
	}
	ok, err := storage.SupportsReflink(probed)
	switch {
	case err != nil:
		return Probe{Found: fmt.Sprintf("cannot probe %s: %v", probed, err)}
	case ok:
		return Probe{OK: true, Found: probed + " supports reflinks"}
	}
	return Probe{Found: probed + " does not support reflinks (xfs and btrfs do)"}
}

func probeNFTables() Probe {
	conn, err := nftables.New()
	if err == nil {
		_, err = conn.ListTables()
	}
	if err != nil {
		return Probe{Found: fmt.Sprintf("nf_tables does not answer: %v", err)}
	}
	return Probe{OK: true, Found: "nf_tables answers"}
}

func probeTun() Probe {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return Probe{Found: fmt.Sprintf("cannot open /dev/net/tun: %v (modprobe tun)", err)}
	}
	f.Close()
	return Probe{OK: true, Found: "/dev/net/tun opens"}
}

func probeCgroups() Probe {
	v, have, err := firecracker.CgroupControllers()
	if err != nil {
		return Probe{Found: fmt.Sprintf("cgroup v%d: %v", v, err)}
	}
	var missing []string
	for _, c := range []string{"cpu", "memory"} {
		if !slices.Contains(have, c) {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return Probe{Found: fmt.Sprintf("cgroup v%d without the %s controller: the jailer cannot limit VMs", v, strings.Join(missing, " and "))}
	}
	return Probe{OK: true, Found: fmt.Sprintf("cgroup v%d with the cpu and memory controllers", v)}
}
