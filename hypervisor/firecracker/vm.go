package firecracker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/hypervisor"
)

// VM is a running Firecracker VM.
type VM struct {
	dir     string
	st      vmState
	proc    *os.File // a pidfd of the Firecracker process
	api     *Client
	console *consolePipe  // nil for a VM started by an older node
	uids    jailUIDs      // where its jail's uid is recorded
	done    chan struct{} // closed once Firecracker has exited and its jail is removed
	closing chan struct{} // closed by Close: stop watching, Firecracker runs on
	close   sync.Once
	log     *slog.Logger
}

// openProcess returns a pidfd of pid: it names that process and no other,
// even once the pid is reused, for watching and for signals, whether the
// process is the node's child or not (after a node restart).
func openProcess(pid int) (*os.File, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("open process %d: %w", pid, err)
	}
	// Non-blocking, so it is waited on by Go's poller, not a thread.
	return os.NewFile(uintptr(fd), fmt.Sprintf("pidfd:%d", pid)), nil
}

func newVM(dir string, st vmState, proc *os.File, console *consolePipe, uids jailUIDs, log *slog.Logger) *VM {
	vm := &VM{dir: dir, st: st, proc: proc, api: NewClient(st.APISocket), console: console, uids: uids,
		done: make(chan struct{}), closing: make(chan struct{}), log: log}
	go vm.watch()
	return vm
}

// watch waits for Firecracker to exit, removes what the VM leaves (its
// jail above all) and closes done.
func (vm *VM) watch() {
	if err := waitExit(vm.proc); err != nil {
		select {
		case <-vm.closing:
			return
		default:
		}
		vm.log.Error("watch firecracker process", "vm", vm.st.ID, "err", err)
		return
	}
	vm.api.Close()
	if err := cleanUp(vm.dir, vm.st, vm.uids); err != nil {
		vm.log.Error("clean up after vm", "vm", vm.st.ID, "err", err)
	}
	close(vm.done)
	// Only now: a Stop under way may still signal the (exited) process
	// until done is closed, and gets ESRCH rather than a closed file.
	_ = vm.proc.Close()
}

// waitExit blocks until the process of pidfd f has exited: a pidfd polls
// readable then.
func waitExit(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		return err == nil && n > 0
	})
}

func (vm *VM) signal(sig syscall.Signal) error {
	rc, err := vm.proc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return err
	}
	return serr
}

// Pid returns Firecracker's process id (in the node's PID namespace).
func (vm *VM) Pid() int { return vm.st.PID }

// Dir returns the VM's runtime directory.
func (vm *VM) Dir() string { return vm.dir }

// Done is closed once Firecracker has exited and the VM's jail is removed.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// ConsoleLog is the file that receives the guest's serial console, capped
// and rotated (package console).
func (vm *VM) ConsoleLog() string { return filepath.Join(vm.dir, ConsoleLog) }

// VsockSocket is the host end of the VM's vsock device, or "" when it has
// none.
func (vm *VM) VsockSocket() string { return vm.st.VsockSocket }

// Jail returns the VM's jail, or nil when Firecracker runs unjailed.
func (vm *VM) Jail() *Jail { return vm.st.Jail }

// controlRetry is how often DialControl asks again while nothing in the
// guest listens yet.
const controlRetry = 20 * time.Millisecond

// DialControl connects to the guest init's control channel. Firecracker
// refuses the connection until the init listens on its port, a few
// hundred milliseconds into the boot: it asks again until ctx ends or
// the VM is gone.
func (vm *VM) DialControl(ctx context.Context) (net.Conn, error) {
	if vm.st.VsockSocket == "" {
		return nil, fmt.Errorf("vm %s has no control channel", vm.st.ID)
	}
	for {
		conn, err := DialVsock(ctx, vm.st.VsockSocket, ControlVsockPort)
		if err == nil || !errors.Is(err, ErrVsockRefused) {
			return conn, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("vm %s: control channel: %w", vm.st.ID, ctx.Err())
		case <-vm.done:
			return nil, fmt.Errorf("vm %s: control channel: %w", vm.st.ID, ErrVMGone)
		case <-time.After(controlRetry):
		}
	}
}

// Pause stops the guest's vCPUs.
func (vm *VM) Pause(ctx context.Context) error { return vm.api.Pause(ctx) }

// Resume restarts a paused guest.
func (vm *VM) Resume(ctx context.Context) error { return vm.api.Resume(ctx) }

// Stop ends the VM, escalating: halt (when given: asks the guest's init to
// unmount and reboot), then ctrl-alt-del, then SIGKILL, each with its
// deadline. There is no SIGTERM step: Firecracker has no handler for it,
// so it would end Firecracker no more gently than SIGKILL, and as the init
// of its PID namespace it does not even receive it. It returns nil once
// Firecracker has exited and the jail is removed.
func (vm *VM) Stop(ctx context.Context, halt func(context.Context) error, t hypervisor.StopTimeouts) error {
	select {
	case <-vm.closing:
		return fmt.Errorf("stop vm %s: the handle was closed", vm.st.ID)
	default:
	}
	return hypervisor.Escalate(ctx, vm.st.ID, vm.done, []hypervisor.StopStep{
		{Name: "halt", Timeout: t.Halt, Act: halt},
		{Name: "ctrl-alt-del", Timeout: t.Shutdown, Act: vm.api.SendCtrlAltDel},
		{Name: "sigkill", Timeout: t.Kill, Act: func(context.Context) error {
			err := vm.signal(syscall.SIGKILL)
			if errors.Is(err, unix.ESRCH) {
				return nil // exited meanwhile
			}
			return err
		}},
	}, vm.log)
}

// Close stops watching the VM without stopping it, as the node does when
// it exits and leaves its VMs running.
func (vm *VM) Close() {
	vm.close.Do(func() {
		close(vm.closing)
		vm.api.Close()
		_ = vm.proc.Close()
		if vm.console != nil {
			vm.console.Close()
		}
	})
}
