// Package hostcheck finds out what this host can run (KVM, Firecracker and
// its jailer, QEMU, device-mapper, reflinks, vsock sockets, nftables,
// tun, cgroups, UEFI firmware, the disk tools) and decides from that and the node's
// settings which hypervisor runs each message and how Firecracker root
// disks are made. `alephvm doctor` prints it; the node decides by it at
// start.
//
// Each probe exercises the capability as the node will use it, rather
// than trusting a file's name: KVM boots a probe guest, device-mapper is
// asked for its snapshot targets, a reflink is made where the disks go, a
// cgroup is made and limited as the jailer does, a vsock socket is bound
// and the CONNECT handshake spoken where Firecracker's will be, and the
// firmware's variable store is copied as each instance's is.
package hostcheck

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

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
	Vsock        Probe // the host end of Firecracker VMs' vsock: a unix socket
	Firmware     Probe // UEFI firmware for instances of UEFI disk images (QEMU)
	Tools        Probe // the programs the node runs to make disks
}

// Paths are where the probes look.
type Paths struct {
	Firecracker string // binary, a path or a name in PATH
	Jailer      string
	QEMU        string
	DataDir     string // where the VMs' disks are made
	RunDir      string // where the VMs' runtime directories are made
	UseJailer   bool
	JailerBase  string // the jailer's chroot base directory
	UEFICode    string // firmware code, and its variable store template
	UEFIVars    string
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
		Vsock:        probeVsock(ctx, vsockSocketPath(p)),
		Firmware:     ProbeFirmware(p.UEFICode, p.UEFIVars, p.DataDir),
		Tools:        probeTools(ctx, diskTools),
	}
	h.KVM = probeKVM(ctx, kvmDevice, p.QEMU, h.QEMU.OK)
	return h
}

// kvmDevice is KVM's device node.
const kvmDevice = "/dev/kvm"

// KVM_GET_API_VERSION, _IO(0xAE, 0x00), answers 12, the only KVM API
// version there is.
const (
	kvmGetAPIVersion = 0xAE00
	kvmAPIVersion    = 12
)

// probeKVM asks the KVM device for its API version, then boots a probe
// guest under it with QEMU: a /dev/kvm that cannot run ordinary guests
// (nested virtualization without the CPU features they need) answers the
// first and fails the second.
func probeKVM(ctx context.Context, device, qemuBin string, haveQEMU bool) Probe {
	f, err := os.OpenFile(device, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return Probe{Found: "no " + device + ": the kernel has no KVM, or it is not loaded (modprobe kvm_intel or kvm_amd)"}
	}
	if err != nil {
		return Probe{Found: fmt.Sprintf("cannot open %s: %v", device, err)}
	}
	version, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	f.Close()
	switch {
	case err != nil:
		return Probe{Found: fmt.Sprintf("%s does not answer as KVM: %v", device, err)}
	case version != kvmAPIVersion:
		return Probe{Found: fmt.Sprintf("%s speaks KVM API %d, not %d", device, version, kvmAPIVersion)}
	case !haveQEMU:
		return Probe{Found: device + " answers, but whether it runs ordinary guests is unknown: the probe guest boots under QEMU, which is missing"}
	}
	if qemu.KVMUsable(ctx, qemuBin) {
		return Probe{OK: true, Found: device + " runs ordinary guests (a probe guest booted under it)"}
	}
	return Probe{Found: device + " answers but runs no ordinary guest: a probe guest failed under it (nested virtualization without the CPU features guests need?)"}
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
	probed := existingParent(dir)
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

// probeCgroups makes a cgroup in each hierarchy the jailer limits VMs
// in, writes each limit file the jailer writes (its own value back, which
// changes nothing) and removes the cgroup.
func probeCgroups() Probe {
	v, files, err := firecracker.CgroupLimitFiles()
	if err != nil {
		return Probe{Found: fmt.Sprintf("cgroup v%d: %v", v, err)}
	}
	if err := tryCgroups(files, fmt.Sprintf("alephvm-probe-%d", os.Getpid())); err != nil {
		return Probe{Found: fmt.Sprintf("cgroup v%d: %v: the jailer cannot limit VMs", v, err)}
	}
	return Probe{OK: true, Found: fmt.Sprintf("cgroup v%d: a cgroup limited by its cpu and memory files", v)}
}

// tryCgroups does what probeCgroups says in the hierarchies of files
// (hierarchy directory -> limit files), which must hold the cpu and
// memory ones.
func tryCgroups(files map[string][]string, name string) error {
	var all []string
	for _, fs := range files {
		all = append(all, fs...)
	}
	for _, want := range []string{"cpu", "memory"} {
		if !slices.ContainsFunc(all, func(f string) bool { return strings.HasPrefix(f, want+".") }) {
			return fmt.Errorf("no %s controller", want)
		}
	}
	for _, dir := range slices.Sorted(maps.Keys(files)) {
		cg := filepath.Join(dir, name)
		if err := os.Mkdir(cg, 0o755); err != nil {
			return fmt.Errorf("make a cgroup in %s: %w", dir, err)
		}
		err := writeLimits(cg, files[dir])
		if rerr := os.Remove(cg); err == nil && rerr != nil {
			err = fmt.Errorf("remove the probe cgroup: %w", rerr)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func writeLimits(cg string, files []string) error {
	for _, name := range files {
		path := filepath.Join(cg, name)
		value, err := os.ReadFile(path)
		if err == nil {
			err = os.WriteFile(path, value, 0)
		}
		if err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
	}
	return nil
}

// vsockSocketPath is where the host end of a Firecracker VM's vsock (or
// its API socket, the longer) is made, for the longest VM name the node
// gives.
func vsockSocketPath(p Paths) string {
	const name, dir = "inst-0123456789ab", "i-0123456789abcdef"
	api, vsock := firecracker.SocketPaths(p.UseJailer, p.JailerBase, p.Firecracker, filepath.Join(p.RunDir, dir), name)
	if len(api) > len(vsock) {
		return api
	}
	return vsock
}

// probeVsock checks that Firecracker's sockets fit at path (a unix socket
// address holds 107 bytes), then binds a unix socket in the nearest
// directory of path that exists and speaks the vsock CONNECT handshake
// with itself through firecracker.DialVsock, as the node does with each
// program VM.
func probeVsock(ctx context.Context, path string) Probe {
	if len(path) > firecracker.MaxSocketPath {
		return Probe{Found: fmt.Sprintf("a VM's socket would be %s, %d bytes, more than the %d a unix socket takes: shorten JAILER_BASE_DIRECTORY or EXECUTION_ROOT",
			path, len(path), firecracker.MaxSocketPath)}
	}
	parent := existingParent(filepath.Dir(path))
	dir, err := os.MkdirTemp(parent, ".vsock-probe-")
	if err != nil {
		return Probe{Found: fmt.Sprintf("cannot make a socket in %s: %v", parent, err)}
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "v.sock")
	if len(sock) > firecracker.MaxSocketPath {
		sock = filepath.Join(dir, "v") // the probe's own directory is deeper than the VMs'
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return Probe{Found: fmt.Sprintf("cannot bind a unix socket in %s: %v", parent, err)}
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		line := make([]byte, 64)
		if n, _ := conn.Read(line); strings.HasPrefix(string(line[:n]), "CONNECT ") {
			conn.Write([]byte("OK 1073741824\n"))
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := firecracker.DialVsock(ctx, sock, 52)
	if err != nil {
		return Probe{Found: fmt.Sprintf("vsock handshake over a unix socket in %s: %v", parent, err)}
	}
	conn.Close()
	return Probe{OK: true, Found: fmt.Sprintf("unix sockets in %s take the vsock handshake; VMs' sockets fit (%d of %d bytes)", parent, len(path), firecracker.MaxSocketPath)}
}

// existingParent is dir, or its nearest parent that exists.
func existingParent(dir string) string {
	for {
		if _, err := os.Stat(dir); err == nil || dir == "/" || dir == "." {
			return dir
		}
		dir = filepath.Dir(dir)
	}
}

// flashBlock is the size QEMU's UEFI flash images come in multiples of.
const flashBlock = 4096

// ProbeFirmware checks the UEFI firmware QEMU boots UEFI disk images with:
// code is read (a whole number of flash blocks), and the variable store
// template vars is copied into the disks' directory dataDir, as each
// instance gets its own copy.
func ProbeFirmware(code, vars, dataDir string) Probe {
	if code == "" || vars == "" {
		return Probe{Found: "UEFI_FIRMWARE_CODE or UEFI_FIRMWARE_VARS is empty: instances of UEFI disk images cannot boot"}
	}
	for _, f := range []string{code, vars} {
		if err := checkFlash(f); err != nil {
			return Probe{Found: fmt.Sprintf("%v: instances of UEFI disk images (debian-12) cannot boot (Debian: apt-get install ovmf)", err)}
		}
	}
	dir, err := os.MkdirTemp(existingParent(dataDir), ".firmware-probe-")
	if err != nil {
		return Probe{Found: fmt.Sprintf("cannot copy the UEFI variable store into %s: %v", dataDir, err)}
	}
	defer os.RemoveAll(dir)
	if _, err := storage.CloneFile(vars, filepath.Join(dir, "efivars.fd")); err != nil {
		return Probe{Found: fmt.Sprintf("cannot copy the UEFI variable store: %v", err)}
	}
	return Probe{OK: true, Found: fmt.Sprintf("%s and %s", code, vars)}
}

func checkFlash(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("UEFI firmware: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("UEFI firmware: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() == 0 || st.Size()%flashBlock != 0 {
		return fmt.Errorf("UEFI firmware %s is not a flash image (%d bytes, not a multiple of %d)", path, st.Size(), flashBlock)
	}
	if _, err := f.ReadAt(make([]byte, flashBlock), 0); err != nil {
		return fmt.Errorf("UEFI firmware %s: %w", path, err)
	}
	return nil
}

// diskTool is a program the node runs, how to ask it for its version, and
// what cannot be done without it.
type diskTool struct {
	name, versionFlag, pkg, needed string
}

// diskTools are the programs package storage runs.
var diskTools = []diskTool{
	{"qemu-img", "--version", "qemu-utils", "instances cannot start (their base images are inspected and layered with it)"},
	{"mkfs.ext4", "-V", "e2fsprogs", "volumes cannot be made"},
	{"e2fsck", "-V", "e2fsprogs", "Firecracker root disks cannot be grown"},
	{"resize2fs", "", "e2fsprogs", "Firecracker root disks cannot be grown"},
}

// probeTools runs each tool (its version, where it has a flag for it).
func probeTools(ctx context.Context, tools []diskTool) Probe {
	var broken []string
	for _, t := range tools {
		bin, err := exec.LookPath(t.name)
		if err == nil && t.versionFlag != "" {
			vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = exec.CommandContext(vctx, bin, t.versionFlag).Run()
			cancel()
		}
		if err != nil {
			broken = append(broken, fmt.Sprintf("%s (Debian: %s) does not run: %s", t.name, t.pkg, t.needed))
		}
	}
	if len(broken) > 0 {
		return Probe{Found: strings.Join(broken, "; ")}
	}
	names := make([]string, len(tools))
	for i, t := range tools {
		names[i] = t.name
	}
	return Probe{OK: true, Found: strings.Join(names, ", ") + " run"}
}
