package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/console"
	"github.com/alephvm/alephvm/internal/release"
)

// Options are the node-wide settings of the Firecracker backend.
type Options struct {
	Firecracker string // the firecracker binary; "firecracker" on PATH when empty
	Jailer      string // the jailer binary; "jailer" on PATH when empty
	// UseJailer runs each Firecracker through the jailer. Without it
	// Firecracker runs as root with no chroot: for development only.
	UseJailer bool
	// JailerBase is the jailer's chroot base directory. Keep it on the
	// filesystem of the store and the volumes, so that files are
	// hard-linked into jails rather than bind-mounted.
	JailerBase string
	// FirstUID is the first of the JailUIDs uids given to jails, one per
	// VM (each jail's gid is its uid).
	FirstUID int
	// ConsoleMaxSize caps each VM's console file (console.log and its
	// rotated half); 0 means console.DefaultMaxSize.
	ConsoleMaxSize int64
}

// apiTimeout bounds the wait for a new Firecracker's API socket.
const apiTimeout = 10 * time.Second

// ControlVsockPort is the guest port of the init's control channel under
// Firecracker, as the guest's protocol fixes it.
const ControlVsockPort = guest.ControlVsockPort

// ErrVMGone is returned by Attach when the VM's process has exited.
var ErrVMGone = errors.New("the VM's firecracker process is gone")

// Driver starts and finds Firecracker VMs.
type Driver struct {
	firecracker   string
	jailer        string
	useJailer     bool
	base          string
	uids          jailUIDs
	cgroupVersion int
	consoleMax    int64
	log           *slog.Logger
	mu            sync.Mutex // held from choosing a jail's uid to making the jail, with uids' host-wide lock
}

// New returns a driver once its binaries are found.
func New(o Options, log *slog.Logger) (*Driver, error) {
	if o.ConsoleMaxSize != 0 && o.ConsoleMaxSize < console.MinMaxSize {
		return nil, fmt.Errorf("firecracker: console cap %d bytes is below the minimum of %d", o.ConsoleMaxSize, console.MinMaxSize)
	}
	// uids is set unjailed too: the jails of VMs started jailed by an
	// earlier node are removed with their records.
	d := &Driver{useJailer: o.UseJailer, uids: jailUIDs{first: o.FirstUID, records: jailUIDDir, proc: "/proc"},
		cgroupVersion: CgroupVersion(), consoleMax: o.ConsoleMaxSize, log: log}
	var err error
	if d.firecracker, err = findBinary(o.Firecracker, "firecracker"); err != nil {
		return nil, err
	}
	if o.UseJailer {
		if d.jailer, err = findBinary(o.Jailer, "jailer"); err != nil {
			return nil, err
		}
		if o.FirstUID <= 0 {
			return nil, fmt.Errorf("firecracker: jail uids must start above 0, got %d", o.FirstUID)
		}
		if d.base, err = filepath.Abs(o.JailerBase); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(d.base, 0o755); err != nil {
			return nil, fmt.Errorf("firecracker: jailer base directory: %w", err)
		}
		// The jailer resolves both, and names jails after the binary.
		if d.base, err = filepath.EvalSymlinks(d.base); err != nil {
			return nil, err
		}
	}
	log.Info("firecracker backend ready", "firecracker", d.firecracker, "jailer", d.jailer, "cgroup_version", d.cgroupVersion)
	return d, nil
}

func findBinary(path, name string) (string, error) {
	if path == "" {
		path = name
	}
	bin, err := exec.LookPath(path)
	if err != nil {
		return "", fmt.Errorf("firecracker backend: %s: %w (Firecracker %s is not packaged by Debian: install its release binaries)", name, err, Version)
	}
	if bin, err = filepath.EvalSymlinks(bin); err != nil {
		return "", fmt.Errorf("firecracker backend: %s: %w", name, err)
	}
	return filepath.Abs(bin)
}

// vmState is what Attach needs to find a VM again, kept in its runtime
// directory.
type vmState struct {
	ID          string `json:"id"`
	PID         int    `json:"pid"`
	APISocket   string `json:"api_socket"`             // on the host
	VsockSocket string `json:"vsock_socket,omitempty"` // on the host
	ConfigArg   string `json:"config_file"`            // as given to firecracker, to know its process
	Jail        *Jail  `json:"jail,omitempty"`
}

// Start boots a VM: it writes the config file, lays out the jail, runs
// the jailer (or Firecracker itself) detached in a session of its own, and
// returns once the API socket says the VM runs. Firecracker boots the VM
// from the config file alone. On failure nothing of the VM is left but its
// logs.
func (d *Driver) Start(ctx context.Context, spec hypervisor.Spec) (_ *VM, err error) {
	st := vmState{ID: spec.Name}
	var paths Paths
	if d.useJailer {
		// The uid is chosen when the jail is made, below.
		if st.Jail, paths, err = PlanJail(spec, d.base, filepath.Base(d.firecracker), 0, 0); err != nil {
			return nil, err
		}
		st.APISocket, st.ConfigArg = st.Jail.HostPath(jailAPI), jailConfig
		if spec.Control {
			st.VsockSocket = st.Jail.HostPath(jailVsock)
		}
	} else {
		paths = Paths{
			VsockSocket: filepath.Join(spec.Dir, VsockSocket),
			LogFile:     filepath.Join(spec.Dir, LogFile),
			MetricsFile: filepath.Join(spec.Dir, MetricsFile),
		}
		st.APISocket, st.ConfigArg = filepath.Join(spec.Dir, APISocket), filepath.Join(spec.Dir, ConfigFile)
		if spec.Control {
			st.VsockSocket = paths.VsockSocket
		}
		for _, p := range []string{st.APISocket, paths.VsockSocket} {
			if len(p) > maxSocketPath {
				return nil, fmt.Errorf("vm %s: socket path %s is longer than %d bytes: use a shorter runtime directory", spec.Name, p, maxSocketPath)
			}
		}
	}
	cfg, err := BuildConfig(spec, paths)
	if err != nil {
		return nil, err
	}
	if pid, ok := stillRunning(spec.Dir, st); ok {
		return nil, fmt.Errorf("vm %s: firecracker %d still runs for it", spec.Name, pid)
	}
	removeRuntimeFiles(spec.Dir)
	if err := writeRuntimeFiles(spec.Dir, cfg); err != nil {
		return nil, fmt.Errorf("vm %s: %w", spec.Name, err)
	}
	// What the start makes is released in reverse when a later step
	// fails. Once the VM exists, its watcher owns the jail and the
	// console, and the list holds only the VM.
	made := &release.List{}
	defer func() {
		if err != nil {
			if rerr := made.Release(context.WithoutCancel(ctx)); rerr != nil {
				d.log.Error("release a failed start", "vm", spec.Name, "err", rerr)
			}
		}
	}()
	var args []string
	bin := d.firecracker
	if st.Jail != nil {
		if err := d.makeJail(st.Jail); err != nil {
			return nil, fmt.Errorf("vm %s: %w", spec.Name, err)
		}
		made.Add("jail", func(context.Context) error { return removeJail(st.Jail, d.uids) })
		bin, args = d.jailer, JailerArgs(st.Jail, d.firecracker, d.base, d.cgroupVersion, spec.VCPUs, spec.MemoryMiB)
	} else {
		args = []string{"--id", spec.Name, "--config-file", st.ConfigArg, "--api-sock", st.APISocket}
	}
	if err := os.WriteFile(filepath.Join(spec.Dir, ArgsFile), []byte(bin+"\n"+strings.Join(args, "\n")+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("vm %s: write command line: %w", spec.Name, err)
	}

	pipe, err := openConsole(spec.Dir, d.consoleMax, d.log)
	if err != nil {
		return nil, fmt.Errorf("vm %s: %w", spec.Name, err)
	}
	// Firecracker's last words reach console.log once it has exited.
	made.AddFunc("console", func() { pipe.wait(time.Second); pipe.Close() })
	defer pipe.closeWriter()
	// Not CommandContext: the VM must outlive the request that started
	// it. Firecracker's stdout is the guest's serial console.
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = pipe.w, pipe.w
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		pipe.closeWriter()
		return nil, fmt.Errorf("vm %s: start %s: %w", spec.Name, filepath.Base(bin), err)
	}
	pipe.started()
	// fail releases first, so that the error carries the logs' last words.
	fail := func(err error) error {
		if rerr := made.Release(context.WithoutCancel(ctx)); rerr != nil {
			d.log.Error("release a failed start", "vm", spec.Name, "err", rerr)
		}
		return fmt.Errorf("vm %s: %w%s", spec.Name, err, logTails(spec.Dir))
	}
	// Unjailed, Firecracker is this child: its pidfd is opened before
	// anything reaps it, so its pid cannot have been reused.
	st.PID = cmd.Process.Pid
	var proc *os.File
	if st.Jail == nil {
		proc, err = openProcess(st.PID)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	if st.Jail != nil {
		// With --new-pid-ns the jailer clones Firecracker, writes its pid
		// in the jail and exits.
		select {
		case <-exited:
		case <-time.After(apiTimeout):
			_ = cmd.Process.Kill()
			<-exited
			return nil, fail(errors.New("the jailer did not hand over to firecracker"))
		}
		if waitErr != nil {
			return nil, fail(fmt.Errorf("jailer: %w", waitErr))
		}
		st.PID, proc, err = jailedFirecracker(st)
	}
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, fail(err)
	}
	vm := newVM(spec.Dir, st, proc, pipe, d.uids, d.log)
	made = &release.List{}
	made.Add("vm", func(context.Context) error {
		_ = vm.signal(syscall.SIGKILL)
		<-vm.done // the VM's watcher removes the jail
		pipe.wait(time.Second)
		pipe.Close()
		return nil
	})
	waitCtx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	err = hypervisor.WaitFor(waitCtx, "firecracker API socket", vm.done, func(ctx context.Context) error {
		info, err := vm.api.Describe(ctx)
		if err == nil && info.State != StateRunning {
			err = fmt.Errorf("state %q", info.State)
		}
		return err
	})
	if err == nil {
		err = writeState(spec.Dir, st)
	}
	if err != nil {
		return nil, fail(err)
	}
	d.log.Info("vm started", "vm", spec.Name, "pid", st.PID, "jailed", st.Jail != nil, "took", time.Since(started).Round(time.Millisecond))
	return vm, nil
}

// stillRunning returns the pid of a Firecracker already running for the
// VM, as recorded in its runtime directory or, jailed, in its jail: a
// start would clear the files it runs on.
func stillRunning(dir string, st vmState) (int, bool) {
	var pids []int
	var recorded vmState
	if data, err := os.ReadFile(filepath.Join(dir, StateFile)); err == nil && json.Unmarshal(data, &recorded) == nil {
		pids = append(pids, recorded.PID)
	}
	if st.Jail != nil {
		if data, err := os.ReadFile(st.Jail.HostPath(jailerPidFile)); err == nil {
			pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		if pid > 0 && st.isProcess(pid) {
			return pid, true
		}
	}
	return 0, false
}

// jailedFirecracker finds the Firecracker the jailer started, by the pid
// it wrote in the jail.
func jailedFirecracker(st vmState) (int, *os.File, error) {
	data, err := os.ReadFile(st.Jail.HostPath(jailerPidFile))
	if err != nil {
		return 0, nil, fmt.Errorf("jailer's pidfile: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return 0, nil, fmt.Errorf("jailer's pidfile %q: %w", data, err)
	}
	proc, err := openProcess(pid)
	if err == nil && !st.isProcess(pid) {
		proc.Close()
		err = errors.New("it exited as soon as it started")
	}
	if err != nil {
		return pid, nil, fmt.Errorf("firecracker process %d: %w", pid, err)
	}
	return pid, proc, nil
}

// makeJail gives j a free uid (and the same gid), records it host-wide and
// makes the jail, all under d.mu and the records' host-wide lock: a uid is
// chosen from what the jails and records on disk say (jailUIDs), and
// another node process choosing at the same time would otherwise see
// neither this jail nor its record yet, and choose the same uid.
func (d *Driver) makeJail(j *Jail) (err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	unlock, err := d.uids.lock()
	if err != nil {
		return err
	}
	defer unlock()
	uid, err := d.uids.free(filepath.Dir(j.Dir))
	if err != nil {
		return err
	}
	j.UID, j.GID = uid, uid
	if err := d.uids.record(uid, j.Root()); err != nil {
		return err
	}
	if err := j.Create(); err != nil {
		if derr := d.uids.drop(uid); derr != nil {
			return fmt.Errorf("%w; and: %v", err, derr)
		}
		return err
	}
	return nil
}

// removeJail removes j, then its uid's record (see jailUIDs).
func removeJail(j *Jail, uids jailUIDs) error {
	if err := j.Remove(); err != nil {
		return err
	}
	return uids.forget(j.UID)
}

// writeRuntimeFiles writes the config file and makes Firecracker's log
// and metrics files (Firecracker writes into them from their start
// without truncating).
func writeRuntimeFiles(dir string, cfg Config) error {
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	// Readable by the jail's uid: it holds paths, no secret.
	if err := os.WriteFile(filepath.Join(dir, ConfigFile), append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	if err := os.Chmod(filepath.Join(dir, ConfigFile), 0o644); err != nil {
		return err
	}
	for _, name := range []string{LogFile, MetricsFile} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// removeRuntimeFiles removes the sockets and state a VM leaves in its
// runtime directory (its logs stay).
func removeRuntimeFiles(dir string) {
	for _, name := range []string{APISocket, VsockSocket, StateFile, ConsoleFIFO} {
		_ = os.Remove(filepath.Join(dir, name))
	}
}

func writeState(dir string, st vmState) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, StateFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("write vm state: %w", err)
	}
	return os.Rename(tmp, filepath.Join(dir, StateFile))
}

// logTails returns the ends of the console and Firecracker's log, which
// say why a VM did not start.
func logTails(dir string) string {
	var b strings.Builder
	for _, name := range []string{ConsoleLog, LogFile} {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			continue
		}
		if st, err := f.Stat(); err == nil && st.Size() > 2048 {
			_, _ = f.Seek(-2048, io.SeekEnd)
		}
		data, _ := io.ReadAll(f)
		f.Close()
		if s := strings.TrimSpace(string(data)); s != "" {
			fmt.Fprintf(&b, "\n%s: %s", name, s)
		}
	}
	return b.String()
}

// isProcess reports whether pid is this VM's Firecracker: a pid may have
// been reused since it was written down.
func (st vmState) isProcess(pid int) bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	s := "\x00" + string(cmdline)
	return strings.Contains(s, "\x00--id\x00"+st.ID+"\x00") && strings.Contains(s, "\x00--config-file\x00"+st.ConfigArg+"\x00")
}

// Attach finds the VM whose runtime directory is dir, started by this or an
// earlier node process. A VM whose process is gone is cleaned up (its jail
// removed) and ErrVMGone returned.
func (d *Driver) Attach(ctx context.Context, dir string) (*VM, error) {
	data, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return nil, fmt.Errorf("attach to vm in %s: %w", dir, err)
	}
	var st vmState
	if err := json.Unmarshal(data, &st); err != nil || st.PID <= 0 {
		return nil, fmt.Errorf("attach to vm in %s: bad state file: %v", dir, err)
	}
	proc, err := openProcess(st.PID)
	if err == nil && !st.isProcess(st.PID) {
		proc.Close()
		err = ErrVMGone
	}
	if err != nil {
		if cerr := cleanUp(dir, st, d.uids); cerr != nil {
			return nil, fmt.Errorf("attach to vm in %s: %w; and: %v", dir, ErrVMGone, cerr)
		}
		return nil, fmt.Errorf("attach to vm in %s: %w (process %d)", dir, ErrVMGone, st.PID)
	}
	pipe, err := attachConsole(dir, d.consoleMax, d.log)
	if err != nil {
		d.log.Warn("vm console: output not kept (a VM started by an older node writes its console.log itself)", "dir", dir, "err", err)
	}
	vm := newVM(dir, st, proc, pipe, d.uids, d.log)
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	if _, err := vm.api.Describe(ctx); err != nil {
		vm.Close()
		return nil, fmt.Errorf("attach to vm in %s: %w", dir, err)
	}
	return vm, nil
}

// cleanUp removes what a VM leaves once its process is gone: its jail
// (and its uid's record in uids), sockets and state file.
func cleanUp(dir string, st vmState, uids jailUIDs) error {
	if st.Jail != nil {
		if err := removeJail(st.Jail, uids); err != nil {
			return err
		}
	}
	removeRuntimeFiles(dir)
	return nil
}
