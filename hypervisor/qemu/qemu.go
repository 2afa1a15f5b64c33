// Package qemu runs VMs with QEMU. Each VM is its own daemonized QEMU
// process, detached from the node, with a QMP socket and a pidfile in the
// VM's runtime directory, so that it survives a node restart and is found
// again with Attach. The command line is built by a pure function (Args)
// and tested as text.
package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/console"
)

// Names of the files a VM keeps in its runtime directory.
const (
	QMPSocket     = "qmp.sock"
	PidFile       = "qemu.pid"
	ConsoleLog    = hypervisor.ConsoleLog
	ControlSocket = "control.sock"
	// GuestAgentSocket is the host end of the guest agent's channel.
	GuestAgentSocket = "qga.sock"
	ArgsFile         = "qemu.args"
	QEMULog          = "qemu.log" // QEMU's own messages
)

// maxSocketPath is the longest unix socket path Linux accepts.
const maxSocketPath = 107

// Options are the node-wide settings of the QEMU backend.
type Options struct {
	Binary string // qemu-system-x86_64 by default
	// Accel is "kvm", "tcg", or "auto" (kvm when a probe guest runs under
	// it, tcg otherwise). Resolve "auto" with ResolveAccel before Args.
	Accel string
	// RunAs is who QEMU runs as once it has opened its files and devices
	// (-runas): RunAsPerVM (empty, the default) for a uid and gid of its
	// own per VM from FirstUID; RunAsRoot to keep root (for debugging
	// only); or a user name or uid:gid shared by every VM, never uid 0.
	RunAs string
	// ConsoleMaxSize caps each VM's console file (console.log and its
	// rotated half); 0 means console.DefaultMaxSize.
	ConsoleMaxSize int64
	// FirstUID is the first of the UIDs uids given to VMs under
	// RunAsPerVM; 0 means DefaultFirstUID.
	FirstUID int
}

// Sandbox returns the -sandbox option: QEMU's seccomp filter, which
// forbids obsolete system calls, spawning processes and changing resource
// limits or scheduling, and, unless QEMU must drop to another user
// itself (runAs), setuid and its kind. (QEMU installs the filter before it
// drops: with elevateprivileges=deny its own setuid kills it. Once it has
// dropped, it has no privilege left to elevate.)
func Sandbox(runAs bool) string {
	elevate := "deny"
	if runAs {
		elevate = "allow"
	}
	return "on,obsolete=deny,elevateprivileges=" + elevate + ",spawn=deny,resourcecontrol=deny"
}

// Args returns QEMU's command line (without the binary) for spec. accel
// must be "kvm" or "tcg"; runAs is -runas's user name or uid:gid, empty
// for QEMU to stay root.
func Args(spec hypervisor.Spec, accel, runAs string) ([]string, error) {
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("vm %s: %w", spec.Name, err)
	}
	if accel != "kvm" && accel != "tcg" {
		return nil, fmt.Errorf("accelerator must be kvm or tcg, got %q", accel)
	}
	for _, name := range []string{QMPSocket, ControlSocket, GuestAgentSocket} {
		if p := filepath.Join(spec.Dir, name); len(p) > maxSocketPath {
			return nil, fmt.Errorf("vm %s: socket path %s is longer than %d bytes: use a shorter runtime directory", spec.Name, p, maxSocketPath)
		}
	}
	dir := func(name string) string { return opt(filepath.Join(spec.Dir, name)) }
	machine := "q35"
	if spec.Memory != nil {
		machine += ",memory-backend=" + memoryBackend
	}
	a := []string{
		"-name", "guest=" + spec.Name + ",debug-threads=on",
		"-machine", machine,
		"-accel", accel,
	}
	if accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	a = append(a,
		"-smp", SMP(spec.VCPUs, accel),
		"-m", strconv.Itoa(spec.MemoryMiB)+"M",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-sandbox", Sandbox(runAs != ""),
		"-msg", "timestamp=on",
		"-pidfile", dir(PidFile),
		"-qmp", "unix:"+dir(QMPSocket)+",server=on,wait=off",
		"-chardev", "ringbuf,id="+consoleDevice+",size="+strconv.Itoa(ConsoleRingSize),
		"-serial", "chardev:"+consoleDevice,
		"-object", "rng-random,id=rng0,filename=/dev/urandom",
		"-device", "virtio-rng-pci,rng=rng0"+slot(spec, slotRNG),
	)
	if m := spec.Memory; m != nil {
		share := "off"
		if m.Shared {
			share = "on"
		}
		a = append(a, "-object", fmt.Sprintf("memory-backend-file,id=%s,size=%dM,mem-path=%s,share=%s", memoryBackend, spec.MemoryMiB, opt(m.Path), share))
	}
	if spec.FixedSlots {
		// A new generation ID for each VM: a guest kernel with the vmgenid
		// driver reseeds its random generator when it changes.
		a = append(a, "-device", "vmgenid,guid=auto")
	}
	if spec.Incoming != "" {
		a = append(a, "-incoming", "defer")
	}
	if runAs != "" {
		a = append(a, "-runas", runAs)
	}
	if spec.RebootExits {
		a = append(a, "-no-reboot")
	}
	if spec.Boot.FirmwareCode != "" {
		a = append(a,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+opt(spec.Boot.FirmwareCode),
			"-drive", "if=pflash,format=raw,unit=1,file="+opt(spec.Boot.FirmwareVars),
		)
	}
	if spec.Boot.Kernel != "" {
		a = append(a, "-kernel", spec.Boot.Kernel)
		if spec.Boot.Initrd != "" {
			a = append(a, "-initrd", spec.Boot.Initrd)
		}
		if cmdline := KernelCmdline(spec, accel); cmdline != "" {
			a = append(a, "-append", cmdline)
		}
	}
	for i, d := range spec.Drives {
		id := "drive" + strconv.Itoa(i)
		for _, node := range blockdevs(id, d) {
			a = append(a, "-blockdev", node)
		}
		dev := "virtio-blk-pci,drive=" + id + slot(spec, slotFirstDrive+i)
		if d.Serial != "" {
			dev += ",serial=" + opt(d.Serial)
		}
		if i == 0 && spec.Boot.Kernel == "" {
			dev += ",bootindex=0"
		}
		a = append(a, "-device", dev)
	}
	for i, n := range spec.NICs {
		id := "net" + strconv.Itoa(i)
		a = append(a,
			"-netdev", fmt.Sprintf("tap,id=%s,ifname=%s,script=no,downscript=no", id, n.Tap),
			"-device", fmt.Sprintf("virtio-net-pci,netdev=%s,mac=%s,romfile=%s", id, n.MAC, slot(spec, slotFirstNIC+i)),
		)
	}
	if spec.Control || spec.GuestAgent {
		a = append(a, "-device", "virtio-serial-pci,id=vser0"+slot(spec, slotSerial))
	}
	if spec.Control {
		a = append(a,
			"-chardev", "socket,id=control,path="+dir(ControlSocket)+",server=on,wait=off",
			"-device", "virtserialport,bus=vser0.0,chardev=control,name="+opt(spec.ControlPort),
		)
	}
	if spec.GuestAgent {
		a = append(a,
			"-chardev", "socket,id=qga,path="+dir(GuestAgentSocket)+",server=on,wait=off",
			"-device", "virtserialport,bus=vser0.0,chardev=qga,name="+GuestAgentPort,
		)
	}
	return a, nil
}

// SMP returns -smp's value for vcpus under accel.
//
// Under TCG a guest of one vCPU is given room for a second one
// (maxcpus=2), never plugged in. When the machine can have only one vCPU,
// TCG translates the guest as if nothing else read its memory: it makes
// locked instructions plain (Linux's smp_mb on x86-64, the barrier of
// virtio's rings, is a locked add) and, before QEMU 8.1 (commit c914d46d),
// drops barrier instructions too. But QEMU's device threads read the
// guest's memory while the vCPU runs, so a virtqueue's notification can
// be lost: a program VM under sustained load had its virtio-net transmit
// queue stall for good ("NETDEV WATCHDOG: transmit queue 0 timed out" on
// its console; Debian 12's QEMU 7.2, in 2 of 5 nine-minute proxy
// benchmarks), and nothing reached it again. With room for a second vCPU,
// TCG makes locked instructions atomic host instructions, which are full
// barriers. KVM runs the guest's instructions on the CPU itself.
func SMP(vcpus int, accel string) string {
	if accel == "tcg" && vcpus == 1 {
		return "1,maxcpus=2"
	}
	return strconv.Itoa(vcpus)
}

// KernelCmdline is the command line of spec's kernel under accel. A
// kernel given room for a vCPU that is never plugged in (see SMP) is told
// nr_cpus=1, so that it runs as on one CPU, as it did before: with a second
// possible CPU it keeps its SMP code (locked instructions, which TCG then
// makes calls to atomic helpers), and requests to a program through a
// proxy were about a quarter slower (docs/load.md). Its barriers stay
// locked instructions whatever it is told: the fix holds.
func KernelCmdline(spec hypervisor.Spec, accel string) string {
	if SMP(spec.VCPUs, accel) == strconv.Itoa(spec.VCPUs) || spec.Boot.Cmdline == "" {
		return spec.Boot.Cmdline
	}
	return spec.Boot.Cmdline + " nr_cpus=1"
}

// MachineRevision changes when Args changes the VM's machine in a way
// that a saved VM state depends on (it is part of a program template's
// inputs): 2 gave TCG guests of one vCPU maxcpus=2 (see SMP), 3 told
// their kernel nr_cpus=1.
const MachineRevision = 3

// memoryBackend names the RAM's backend object.
const memoryBackend = "mem0"

// The PCI slots of FixedSlots.
const (
	slotRNG        = 0x02
	slotSerial     = 0x03
	slotFirstDrive = 0x08 // to 0x17
	slotFirstNIC   = 0x18 // to 0x1b
)

// slot returns a device's ",addr=" option under FixedSlots, else nothing.
func slot(spec hypervisor.Spec, n int) string {
	if !spec.FixedSlots {
		return ""
	}
	return fmt.Sprintf(",addr=0x%x", n)
}

// blockdev is one -blockdev node: an image opened with its format driver
// over its file.
type blockdev struct {
	NodeName string       `json:"node-name"`
	Driver   string       `json:"driver"`
	ReadOnly bool         `json:"read-only"`
	Discard  string       `json:"discard,omitempty"`
	File     blockdevFile `json:"file"`
	// Backing names the node under a qcow2 node, or is JSON null: QEMU
	// then opens no backing file, whatever the image's header names.
	Backing json.RawMessage `json:"backing,omitempty"`
}

type blockdevFile struct {
	Driver   string `json:"driver"`
	Filename string `json:"filename"`
	ReadOnly bool   `json:"read-only"`
	Discard  string `json:"discard,omitempty"`
}

// blockdevs returns the -blockdev nodes of drive d, its backing chain
// first (a node must exist before a node names it as its backing), the
// drive's own node, named id, last. Every node names its format, and every
// qcow2 node its backing (the next layer, or none), so QEMU neither probes
// a format nor follows a name written in an image.
func blockdevs(id string, d hypervisor.Drive) []string {
	format := d.Format
	if format == "" {
		format = "raw"
	}
	layers := append([]hypervisor.Layer{{Path: d.Path, Format: format}}, d.Backing...)
	nodes := make([]string, len(layers))
	for j := len(layers) - 1; j >= 0; j-- {
		l := layers[j]
		n := blockdev{NodeName: id, Driver: l.Format, ReadOnly: true, File: blockdevFile{Driver: "file", Filename: l.Path, ReadOnly: true}}
		if j > 0 {
			n.NodeName = fmt.Sprintf("%s-b%d", id, j-1)
		} else if !d.ReadOnly {
			n.ReadOnly, n.File.ReadOnly = false, false
			n.Discard, n.File.Discard = "unmap", "unmap"
		}
		if l.Format == "qcow2" {
			n.Backing = json.RawMessage("null")
			if j+1 < len(layers) {
				n.Backing, _ = json.Marshal(fmt.Sprintf("%s-b%d", id, j))
			}
		}
		b, _ := json.Marshal(n)
		nodes[len(layers)-1-j] = string(b)
	}
	return nodes
}

// opt escapes a value for a QEMU option list, where a comma is doubled.
func opt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// Driver starts and finds QEMU VMs.
type Driver struct {
	binary     string
	accel      string
	runAs      *runAsPolicy
	consoleMax int64
	log        *slog.Logger
}

// New returns a driver, resolving the accelerator now when it is "auto".
func New(ctx context.Context, o Options, log *slog.Logger) (*Driver, error) {
	if o.Binary == "" {
		o.Binary = "qemu-system-x86_64"
	}
	bin, err := exec.LookPath(o.Binary)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w (install Debian's qemu-system-x86)", err)
	}
	runAs, err := newRunAsPolicy(o.RunAs, o.FirstUID)
	if err != nil {
		return nil, err
	}
	accel, err := ResolveAccel(ctx, bin, o.Accel)
	if err != nil {
		return nil, err
	}
	if o.ConsoleMaxSize != 0 && o.ConsoleMaxSize < console.MinMaxSize {
		return nil, fmt.Errorf("qemu: console cap %d bytes is below the minimum of %d", o.ConsoleMaxSize, console.MinMaxSize)
	}
	if o.RunAs == RunAsRoot {
		log.Warn("qemu runs as root: a guest that takes over its QEMU has the host (QEMU_RUNAS=root is for debugging only)")
	}
	log.Info("qemu backend ready", "binary", bin, "accel", accel, "runs_as", runAs.String())
	return &Driver{binary: bin, accel: accel, runAs: runAs, consoleMax: o.ConsoleMaxSize, log: log}, nil
}

// Binary is the QEMU binary the driver runs.
func (d *Driver) Binary() string { return d.binary }

// RunsAs says who the driver's QEMU processes run as.
func (d *Driver) RunsAs() string { return d.runAs.String() }

// Accel returns the accelerator the driver uses.
func (d *Driver) Accel() string { return d.accel }

// Start launches a VM. It returns once QEMU's QMP socket answers; an
// early failure comes with QEMU's own message. QEMU runs in a session of
// its own, so it outlives the node; while the node runs, the node reaps it.
// (QEMU's -daemonize forks, which its seccomp sandbox forbids.)
//
// QEMU opens every file and device of the VM as root, then drops to its
// identity (-runas) before it runs the guest; Start makes sure it did, and
// that its seccomp sandbox is on, or stops it.
func (d *Driver) Start(ctx context.Context, spec hypervisor.Spec) (*VM, error) {
	id, release, err := d.runAs.take()
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", spec.Name, err)
	}
	defer release()
	args, err := Args(spec, d.accel, id.runAs)
	if err != nil {
		return nil, err
	}
	for _, name := range []string{QMPSocket, PidFile, ControlSocket} {
		if err := os.Remove(filepath.Join(spec.Dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("vm %s: clear stale %s: %w", spec.Name, name, err)
		}
	}
	if err := os.WriteFile(filepath.Join(spec.Dir, ArgsFile), []byte(strings.Join(args, "\n")+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("vm %s: write command line: %w", spec.Name, err)
	}
	logPath := filepath.Join(spec.Dir, QEMULog)
	logFile, err := openQEMULog(logPath)
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", spec.Name, err)
	}
	defer logFile.Close()
	// Not CommandContext: the VM must outlive the request that started it.
	cmd := exec.Command(d.binary, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if spec.Incoming != "" {
		state, err := os.Open(spec.Incoming)
		if err != nil {
			return nil, fmt.Errorf("vm %s: saved state: %w", spec.Name, err)
		}
		defer state.Close()
		cmd.ExtraFiles = []*os.File{state} // fd 3: incomingFD
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vm %s: start qemu: %w", spec.Name, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
		// How QEMU ended (an exit status, or the signal that killed it) and
		// its last words: what tells a guest that powered off or a QEMU
		// that crashed from one killed from outside, when it was not
		// stopped on purpose.
		d.log.Info("qemu exited", "vm", spec.Name, "pid", cmd.Process.Pid, "status", cmd.ProcessState.String(),
			"stderr", logTail(logPath, 1024))
	}()
	qmp, err := waitForQMP(ctx, filepath.Join(spec.Dir, QMPSocket), exited)
	if err != nil {
		// QEMU often exits with its reason just as the socket fails.
		select {
		case <-exited:
			err = fmt.Errorf("qemu exited: %v", waitErr)
		case <-time.After(time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		msg, _ := os.ReadFile(logPath)
		return nil, fmt.Errorf("vm %s: %w: %s", spec.Name, err, strings.TrimSpace(string(msg)))
	}
	if err := waitDropped(ctx, cmd.Process.Pid, id, exited); err != nil {
		qmp.Close()
		_ = cmd.Process.Kill()
		<-exited
		return nil, fmt.Errorf("vm %s: qemu stopped: it %w", spec.Name, err)
	}
	if spec.Incoming != "" {
		if err := loadState(ctx, qmp, exited); err != nil {
			qmp.Close()
			_ = cmd.Process.Kill()
			<-exited
			msg, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("vm %s: restore from %s: %w: %s", spec.Name, spec.Incoming, err, strings.TrimSpace(string(msg)))
		}
	}
	vm := newVM(spec.Dir, cmd.Process.Pid, qmp, exited, d.consoleMax, d.log)
	d.log.Info("vm started", "vm", spec.Name, "pid", vm.pid, "accel", d.accel, "uid", id.uid, "took", time.Since(started).Round(time.Millisecond))
	return vm, nil
}

// logTail returns the last n bytes at most of QEMU's log, trimmed.
func logTail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	b := make([]byte, min(st.Size(), n))
	k, _ := f.ReadAt(b, st.Size()-int64(len(b)))
	return strings.TrimSpace(string(b[:k]))
}

// openQEMULog opens a new QEMU's log (its stderr) for it, empty. The
// file is in append mode so that rotating it by truncation (logrotate's
// copytruncate, as the Debian package does) makes QEMU write at its new
// end, not at its old offset past a hole.
func openQEMULog(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
}

// waitForQMP connects to QEMU's QMP socket as soon as it accepts.
func waitForQMP(ctx context.Context, socket string, exited <-chan struct{}) (*QMP, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var qmp *QMP
	err := hypervisor.WaitFor(ctx, "QMP socket", exited, func(ctx context.Context) (err error) {
		qmp, err = DialQMP(ctx, socket)
		return err
	})
	return qmp, err
}

// Attach finds the VM whose runtime directory is dir, started by this or an
// earlier node process, and connects to its QMP socket.
func (d *Driver) Attach(ctx context.Context, dir string) (*VM, error) {
	data, err := os.ReadFile(filepath.Join(dir, PidFile))
	if err != nil {
		return nil, fmt.Errorf("attach to vm in %s: %w", dir, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("attach to vm in %s: bad pidfile %q", dir, data)
	}
	// The pid may have been reused since: the process must be a QEMU
	// started for this directory.
	if !(&VM{dir: dir, pid: pid}).isOurs() {
		return nil, fmt.Errorf("attach to vm in %s: %w: process %d is gone", dir, ErrVMGone, pid)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	qmp, err := DialQMP(ctx, filepath.Join(dir, QMPSocket))
	if err != nil {
		return nil, fmt.Errorf("attach to vm in %s: %w", dir, err)
	}
	return newVM(dir, pid, qmp, nil, d.consoleMax, d.log), nil
}

// ResolveAccel turns "auto" into "kvm" when KVM really runs a guest here,
// else "tcg"; "kvm" and "tcg" are returned as they are.
func ResolveAccel(ctx context.Context, binary, accel string) (string, error) {
	switch accel {
	case "kvm", "tcg":
		return accel, nil
	case "", "auto":
		if KVMUsable(ctx, binary) {
			return "kvm", nil
		}
		return "tcg", nil
	}
	return "", fmt.Errorf("qemu accelerator must be auto, kvm or tcg, got %q", accel)
}

// KVMUsable reports whether KVM runs ordinary guests here, by booting a
// 5-byte guest under it with binary (a qemu-system-x86_64): its firmware
// writes 0x31 to QEMU's isa-debug-exit port, which ends QEMU with status
// 0x31<<1|1. A /dev/kvm that cannot run ordinary guests (as under nested
// virtualization without the needed CPU features) fails or hangs instead.
func KVMUsable(ctx context.Context, binary string) bool {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return false
	}
	dir, err := os.MkdirTemp("", "alephvm-kvm-probe")
	if err != nil {
		return false
	}
	defer os.RemoveAll(dir)
	bios := make([]byte, 64<<10)
	// At the reset vector F000:FFF0: mov al, 0x31; out 0xf4, al; hlt.
	copy(bios[0xfff0:], []byte{0xb0, 0x31, 0xe6, 0xf4, 0xf4})
	biosPath := filepath.Join(dir, "probe.bin")
	if err := os.WriteFile(biosPath, bios, 0o600); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-nodefaults",
		"-no-user-config", "-display", "none", "-bios", biosPath, "-no-reboot",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=0x04")
	err = cmd.Run()
	var exit *exec.ExitError
	return errors.As(err, &exit) && exit.ExitCode() == 0x31<<1|1
}
