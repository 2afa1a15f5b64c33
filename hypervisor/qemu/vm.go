package qemu

import (
	"bytes"
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

	"github.com/alephvm/alephvm/hypervisor"
)

// VM is a running QEMU VM.
type VM struct {
	dir     string
	pid     int
	qmp     *QMP
	exited  <-chan struct{} // closed when the node reaped QEMU, if it is its child
	done    chan struct{}   // closed when QEMU has exited
	closing chan struct{}   // closed by Close: stop watching, QEMU runs on
	pumped  chan struct{}   // closed when the console is no longer copied
	close   sync.Once
	log     *slog.Logger
}

// newVM watches QEMU and copies its console into a file of at most
// consoleMax bytes (0: console.DefaultMaxSize).
func newVM(dir string, pid int, qmp *QMP, exited <-chan struct{}, consoleMax int64, log *slog.Logger) *VM {
	vm := &VM{dir: dir, pid: pid, qmp: qmp, exited: exited, done: make(chan struct{}), closing: make(chan struct{}),
		pumped: make(chan struct{}), log: log}
	go vm.watch()
	go vm.pumpConsole(consoleMax)
	return vm
}

// watch closes done once QEMU has exited. A child of this node is reaped
// by Start's goroutine; a QEMU found again by Attach is watched through its
// QMP connection, which ends when it does, then its pid.
func (vm *VM) watch() {
	if vm.exited != nil {
		select {
		case <-vm.exited:
			close(vm.done)
		case <-vm.closing:
		}
		return
	}
	<-vm.qmp.Done()
	for processAlive(vm.pid) {
		select {
		case <-vm.closing:
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
	close(vm.done)
}

// isOurs reports whether the pid is still this VM's QEMU: a child not yet
// reaped cannot have been reused; another process is checked by its
// command line.
func (vm *VM) isOurs() bool {
	if vm.exited != nil {
		select {
		case <-vm.exited:
			return false
		default:
			return true
		}
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", vm.pid))
	return err == nil && bytes.Contains(cmdline, []byte(filepath.Join(vm.dir, QMPSocket)))
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// Pid returns QEMU's process id.
func (vm *VM) Pid() int { return vm.pid }

// Dir returns the VM's runtime directory.
func (vm *VM) Dir() string { return vm.dir }

// Done is closed when QEMU has exited.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// ControlSocket is the host end of the guest control channel.
func (vm *VM) ControlSocket() string { return filepath.Join(vm.dir, ControlSocket) }

// ConsoleLog is the file that receives the guest's serial console, capped
// and rotated (package console).
func (vm *VM) ConsoleLog() string { return filepath.Join(vm.dir, ConsoleLog) }

// DialControl connects to the guest init's control channel: the unix
// socket QEMU serves for its virtio-serial port, there from QEMU's start.
func (vm *VM) DialControl(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", vm.ControlSocket())
	if err != nil {
		return nil, fmt.Errorf("vm in %s: control channel: %w", vm.dir, err)
	}
	return conn, nil
}

// QMP returns the VM's monitor connection.
func (vm *VM) QMP() *QMP { return vm.qmp }

// Reboot resets the VM as a hardware reset would.
func (vm *VM) Reboot(ctx context.Context) error {
	return vm.qmp.Execute(ctx, "system_reset", nil, nil)
}

// Stop ends the VM, escalating: halt (when given: asks the guest's init to
// unmount and power off), then ACPI power-off, then QMP quit, then
// SIGKILL, each with its deadline. It returns nil once QEMU has exited.
func (vm *VM) Stop(ctx context.Context, halt func(context.Context) error, t hypervisor.StopTimeouts) error {
	select {
	case <-vm.closing:
		return fmt.Errorf("stop vm in %s: the handle was closed", vm.dir)
	default:
	}
	return hypervisor.Escalate(ctx, vm.dir, vm.done, []hypervisor.StopStep{
		{Name: "halt", Timeout: t.Halt, Act: halt},
		{Name: "acpi powerdown", Timeout: t.Shutdown, Act: func(ctx context.Context) error {
			return vm.qmp.Execute(ctx, "system_powerdown", nil, nil)
		}},
		{Name: "qmp quit", Timeout: t.Quit, Act: func(ctx context.Context) error {
			err := vm.qmp.Execute(ctx, "quit", nil, nil)
			if errors.Is(err, ErrVMGone) {
				return nil // QEMU may close the socket before answering
			}
			return err
		}},
		{Name: "sigkill", Timeout: t.Kill, Act: func(context.Context) error {
			if !vm.isOurs() {
				return fmt.Errorf("process %d is no longer this VM's QEMU", vm.pid)
			}
			return syscall.Kill(vm.pid, syscall.SIGKILL)
		}},
	}, vm.log)
}

// Close drops the monitor connection without stopping the VM, as the node
// does when it exits and leaves its VMs running.
func (vm *VM) Close() {
	vm.close.Do(func() {
		close(vm.closing)
		_ = vm.qmp.Close()
		<-vm.pumped // the next node's copy starts where this one ended
	})
}

// BlockStats reads the guest's I/O on its drives from QEMU.
func (vm *VM) BlockStats(ctx context.Context) (BlockStats, error) {
	return vm.qmp.BlockStats(ctx)
}
