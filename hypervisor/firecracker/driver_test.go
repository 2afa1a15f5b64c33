package firecracker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
)

func testLog() *slog.Logger { return slog.New(slog.NewTextHandler(os.Stderr, nil)) }

func checkControl(t *testing.T, vm *VM) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := vm.DialControl(ctx)
	if err != nil {
		t.Fatalf("control channel: %v", err)
	}
	defer conn.Close()
	io.WriteString(conn, "status\n")
	if line, _ := bufio.NewReader(conn).ReadString('\n'); line != "echo status\n" {
		t.Errorf("control channel answered %q", line)
	}
}

func checkPauseResume(t *testing.T, vm *VM) {
	t.Helper()
	ctx := context.Background()
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if info, err := vm.api.Describe(ctx); err != nil || info.State != StatePaused {
		t.Errorf("after pause: %+v, %v", info, err)
	}
	if err := vm.Resume(ctx); err != nil {
		t.Fatal(err)
	}
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	for range 200 {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("process %d still alive", pid)
}

// TestDriverJailed runs the driver against the fake jailer and
// Firecracker: a real chroot, uid, gid and PID namespace, so the fake
// opening every file as the jail's uid proves the jail's owners and modes
// are enough. Then the node goes away and comes back, and ctrl-alt-del
// stops the VM and removes the jail.
func TestDriverJailed(t *testing.T) {
	fx := newJailFixture(t)
	fc, jailer := testenv.FakeFirecracker(t)
	d, err := New(Options{Firecracker: fc, Jailer: jailer, UseJailer: true, JailerBase: fx.base, FirstUID: 1000100}, testLog())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	vm, err := d.Start(ctx, fx.spec)
	if err != nil {
		t.Fatal(err)
	}
	j := vm.Jail()
	// Should the test stop half-way: no VM, no bind mount left behind.
	t.Cleanup(func() {
		_ = syscall.Kill(vm.Pid(), syscall.SIGKILL)
		waitGone(t, vm.Pid())
		_ = j.Remove()
	})
	if j == nil || j.UID != 1000100 {
		t.Fatalf("jail %+v", j)
	}
	fcLog, _ := os.ReadFile(filepath.Join(fx.spec.Dir, LogFile))
	if !strings.Contains(string(fcLog), "running as 1000100:1000100") {
		t.Errorf("firecracker's log: %q", fcLog)
	}
	// The node copies the console from its pipe as it comes.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		console, _ := os.ReadFile(vm.ConsoleLog())
		if strings.Contains(string(console), "inst-1 booted") {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("console: %q", console)
			break
		}
	}
	checkControl(t, vm)
	checkPauseResume(t, vm)
	if _, err := d.Start(ctx, fx.spec); err == nil || !strings.Contains(err.Error(), "still runs") {
		t.Errorf("started a VM twice: %v", err)
	}
	checkControl(t, vm) // its jail untouched

	// A second VM gets the next uid.
	second := fx.spec
	second.Name, second.Dir = "inst-2", t.TempDir()
	second.Drives = second.Drives[1:3] // read-only ones: the others are the first VM's
	vm2, err := d.Start(ctx, second)
	if err != nil {
		t.Fatal(err)
	}
	if vm2.Jail().UID != 1000101 {
		t.Errorf("second jail's uid %d", vm2.Jail().UID)
	}
	if err := vm2.Stop(ctx, nil, hypervisor.StopTimeouts{Shutdown: 5 * time.Second}); err != nil {
		t.Fatal(err)
	}

	// A Firecracker that fails at once: the error says why, no jail stays.
	failing := second
	failing.Name, failing.Dir = "inst-3", t.TempDir()
	failing.Boot.Cmdline = "fake.fail"
	_, err = d.Start(ctx, failing)
	t.Logf("a failing start: %v", err)
	if err == nil || !strings.Contains(err.Error(), "fake.fail in the boot arguments") {
		t.Errorf("start of a failing firecracker: %v", err)
	}
	if _, err := os.Stat(filepath.Join(fx.base, "firecracker", "inst-3")); !os.IsNotExist(err) {
		t.Errorf("jail of a failed start: %v", err)
	}

	// The node exits and comes back.
	vm.Close()
	again, err := d.Attach(ctx, fx.spec.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if again.Pid() != vm.Pid() {
		t.Errorf("attached to pid %d, started %d", again.Pid(), vm.Pid())
	}
	checkControl(t, again)
	err = again.Stop(ctx, func(context.Context) error { return errors.New("no init to ask") },
		hypervisor.StopTimeouts{Halt: time.Second, Shutdown: 5 * time.Second, Kill: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	waitGone(t, again.Pid())
	if _, err := os.Stat(j.Dir); !os.IsNotExist(err) {
		t.Errorf("jail left after stop: %v", err)
	}
	if st := stat(t, fx.spec.Drives[3].Path); st.Uid != 0 {
		t.Errorf("writable drive still owned by %d", st.Uid)
	}
	if _, err := d.Attach(ctx, fx.spec.Dir); !errors.Is(err, ErrVMGone) && !os.IsNotExist(errors.Unwrap(err)) {
		t.Errorf("attach to a stopped VM: %v", err)
	}
}

// TestDriverUnjailed drives the fake Firecracker run directly, as with
// USE_JAILER off.
func TestDriverUnjailed(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	fc, _ := testenv.FakeFirecracker(t)
	d, err := New(Options{Firecracker: fc}, testLog())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	disk := filepath.Join(dir, "disk.ext4")
	os.WriteFile(kernel, []byte("kernel"), 0o644)
	os.WriteFile(disk, make([]byte, 4096), 0o600)
	spec := hypervisor.Spec{Name: "prog-1", Dir: dir, VCPUs: 1, MemoryMiB: 128,
		Boot: hypervisor.Boot{Kernel: kernel}, Drives: []hypervisor.Drive{{Path: disk}},
		Control: true, ControlPort: "org.alephvm.control"}
	ctx := context.Background()

	t.Run("lifecycle", func(t *testing.T) {
		vm, err := d.Start(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Kill(vm.Pid(), syscall.SIGKILL) })
		if vm.Jail() != nil || vm.VsockSocket() != filepath.Join(dir, VsockSocket) {
			t.Errorf("jail %v, vsock %s", vm.Jail(), vm.VsockSocket())
		}
		checkControl(t, vm)
		checkPauseResume(t, vm)
		if _, err := d.Start(ctx, spec); err == nil || !strings.Contains(err.Error(), "still runs") {
			t.Errorf("started a VM twice: %v", err)
		}
		if err := vm.Stop(ctx, nil, hypervisor.StopTimeouts{Shutdown: 5 * time.Second}); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{APISocket, VsockSocket, StateFile} {
			if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
				t.Errorf("%s left after stop", name)
			}
		}
	})

	t.Run("sigkill is the last resort", func(t *testing.T) {
		deaf := spec
		deaf.Boot.Cmdline = "fake.ignore-cad"
		vm, err := d.Start(ctx, deaf)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := vm.Stop(ctx, nil, hypervisor.StopTimeouts{Shutdown: 300 * time.Millisecond, Kill: 5 * time.Second}); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d < 300*time.Millisecond {
			t.Errorf("stopped in %v: ctrl-alt-del was not given its time", d)
		}
		waitGone(t, vm.Pid())
	})

	t.Run("gone while the node was away", func(t *testing.T) {
		vm, err := d.Start(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		vm.Close()
		syscall.Kill(vm.Pid(), syscall.SIGKILL)
		waitGone(t, vm.Pid())
		if _, err := d.Attach(ctx, dir); !errors.Is(err, ErrVMGone) {
			t.Errorf("attach: %v", err)
		}
		if _, err := os.Stat(filepath.Join(dir, StateFile)); err == nil {
			t.Error("state file left after a failed attach")
		}
	})

	t.Run("console", func(t *testing.T) {
		testConsole(t, fc, spec)
	})

	t.Run("start failure says why", func(t *testing.T) {
		broken := spec
		broken.Drives = []hypervisor.Drive{{Path: filepath.Join(dir, "missing.ext4")}}
		_, err := d.Start(ctx, broken)
		t.Log(err)
		if err == nil || !strings.Contains(err.Error(), "missing.ext4") {
			t.Errorf("start with a missing drive: %v", err)
		}
	})
}

// testConsole floods the console of a VM: Firecracker's stdout is the
// non-blocking pipe, the node copies it into a file that stays under its
// cap, and after the node has been away, a new node goes on copying.
func testConsole(t *testing.T, fc string, spec hypervisor.Spec) {
	const maxSize = 64 << 10
	d, err := New(Options{Firecracker: fc, ConsoleMaxSize: maxSize}, testLog())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	spec.Dir = t.TempDir()
	spec.Boot.Cmdline = "fake.flood"
	vm, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(vm.Pid(), syscall.SIGKILL) })

	stdout, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/1", vm.Pid()))
	if err != nil || stdout != filepath.Join(spec.Dir, ConsoleFIFO) {
		t.Errorf("firecracker's stdout is %q (%v), want the console pipe", stdout, err)
	}
	fdinfo, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/1", vm.Pid()))
	var flags int
	for _, line := range strings.Split(string(fdinfo), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%o", &flags)
		}
	}
	if flags&syscall.O_NONBLOCK == 0 {
		t.Errorf("firecracker's stdout is blocking (flags %o): a node that stops reading would stall the guest", flags)
	}

	rotated := func() uint64 {
		var total int64
		for _, p := range []string{vm.ConsoleLog(), vm.ConsoleLog() + ".1"} {
			if st, err := os.Stat(p); err == nil {
				total += st.Size()
			}
		}
		if total > maxSize {
			t.Fatalf("the console holds %d bytes, over its cap of %d", total, maxSize)
		}
		st, err := os.Stat(vm.ConsoleLog() + ".1")
		if err != nil {
			return 0
		}
		return st.Sys().(*syscall.Stat_t).Ino
	}
	waitRotation := func(from uint64) {
		t.Helper()
		for range 500 {
			if rotated() != from {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatal("the console was not rotated")
	}
	waitRotation(0)
	data, _ := os.ReadFile(vm.ConsoleLog() + ".1")
	if !strings.Contains(string(data), "console: line ") {
		t.Errorf("the console does not hold the guest's lines: %q", data[:min(len(data), 200)])
	}

	// The node goes away: nothing is copied, the guest goes on.
	vm.Close()
	before := rotated()
	time.Sleep(300 * time.Millisecond)
	if rotated() != before {
		t.Error("the console was rotated while no node copied it")
	}
	again, err := d.Attach(ctx, spec.Dir)
	if err != nil {
		t.Fatal(err)
	}
	waitRotation(before)
	if err := again.Stop(ctx, nil, hypervisor.StopTimeouts{Shutdown: 5 * time.Second}); err != nil {
		t.Fatal(err)
	}
	again.console.wait(5 * time.Second)
	select {
	case <-again.console.done:
	default:
		t.Error("the console is still copied after firecracker exited")
	}
	rotated()
}
