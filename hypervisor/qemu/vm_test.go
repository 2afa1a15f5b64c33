package qemu

import (
	"context"
	"errors"
	"fmt"
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

func TestMain(m *testing.M) { testenv.RunIsolated(m) }

// blankVM returns a spec of a VM whose only disk is blank: SeaBIOS finds
// nothing to boot and waits, which is enough to drive QEMU itself.
func blankVM(t *testing.T) hypervisor.Spec {
	dir := t.TempDir()
	disk := filepath.Join(dir, "blank.img")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return hypervisor.Spec{Name: "blank", Dir: dir, VCPUs: 1, MemoryMiB: 64,
		Drives: []hypervisor.Drive{{Path: disk}}, Control: true, ControlPort: "org.alephvm.control"}
}

func newTestDriver(t *testing.T) *Driver { return newTestDriverAs(t, RunAsPerVM) }

func newTestDriverAs(t *testing.T, runAs string) *Driver {
	testenv.RequireTools(t, "qemu-system-x86_64")
	d, err := New(context.Background(), Options{Accel: "tcg", RunAs: runAs}, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestLifecycle(t *testing.T) {
	d := newTestDriver(t)
	ctx := context.Background()
	spec := blankVM(t)
	vm, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if (&VM{dir: spec.Dir, pid: vm.Pid()}).isOurs() {
			_ = syscall.Kill(vm.Pid(), syscall.SIGKILL)
		}
	})
	if st, err := vm.QMP().Status(ctx); err != nil || st != "running" {
		t.Fatalf("status %q, %v", st, err)
	}
	if _, err := os.Stat(vm.ControlSocket()); err != nil {
		t.Errorf("control socket: %v", err)
	}
	// QEMU runs as a uid of its own, under its seccomp filter.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", vm.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	ids, _ := hypervisor.ProcessIDs(fmt.Sprintf("/proc/%d/status", vm.Pid()))
	for _, id := range ids {
		if id < DefaultFirstUID || id >= DefaultFirstUID+UIDs {
			t.Errorf("qemu runs with uid or gid %d, outside its range (root is 0):\n%s", id, status)
		}
	}
	if !strings.Contains(string(status), "Seccomp:\t2") {
		t.Errorf("qemu has no seccomp filter:\n%s", status)
	}
	t.Logf("qemu %d runs as uids and gids %v", vm.Pid(), ids)

	// The node goes away and comes back: the VM is still there.
	vm.Close()
	again, err := d.Attach(ctx, spec.Dir)
	if err != nil {
		t.Fatalf("attach after close: %v", err)
	}
	if again.Pid() != vm.Pid() {
		t.Errorf("pid %d, want %d", again.Pid(), vm.Pid())
	}
	if err := again.Reboot(ctx); err != nil {
		t.Errorf("reboot: %v", err)
	}

	// No OS answers the power button, so stopping escalates to quit.
	start := time.Now()
	err = again.Stop(ctx, func(context.Context) error { return errors.New("no init to ask") },
		hypervisor.StopTimeouts{Halt: time.Second, Shutdown: 500 * time.Millisecond, Quit: 5 * time.Second, Kill: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-again.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if processAlive(again.Pid()) {
		t.Errorf("qemu %d still alive", again.Pid())
	}
	t.Logf("stopped in %v", time.Since(start))
	if _, err := d.Attach(ctx, spec.Dir); err == nil {
		t.Error("attached to a stopped VM")
	}
}

func TestStartReportsQEMUErrors(t *testing.T) {
	d := newTestDriver(t)
	spec := blankVM(t)
	spec.Drives[0].Path = filepath.Join(spec.Dir, "missing.img")
	_, err := d.Start(context.Background(), spec)
	if err == nil {
		t.Fatal("started with a missing disk")
	}
	t.Log(err)
}

func TestSIGKILLIsTheLastResort(t *testing.T) {
	d := newTestDriverAs(t, RunAsRoot) // root, as QEMU_RUNAS=root asks
	ctx := context.Background()
	vm, err := d.Start(ctx, blankVM(t))
	if err != nil {
		t.Fatal(err)
	}
	// Stop QEMU's process so that it can answer nothing: only SIGKILL ends it.
	if err := syscall.Kill(vm.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	err = vm.Stop(ctx, nil, hypervisor.StopTimeouts{Shutdown: 300 * time.Millisecond, Quit: 300 * time.Millisecond, Kill: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if processAlive(vm.Pid()) {
		t.Errorf("qemu %d still alive", vm.Pid())
	}
}

// floodVM returns a spec of a VM whose firmware writes lines of 64 "A" to
// the serial port as fast as it can, forever.
func floodVM(t *testing.T) hypervisor.Spec {
	spec := blankVM(t)
	fw := make([]byte, 64<<10)
	copy(fw[0xff00:], []byte{
		0xba, 0xf8, 0x03, // mov dx, 0x3f8
		0xbb, 0x00, 0x00, // mov bx, 0
		0xb9, 0x40, 0x00, // line: mov cx, 64
		0xb0, 0x41, // mov al, 'A'
		0xee,       // char: out dx, al
		0xe2, 0xfd, // loop char
		0xb0, 0x0a, // mov al, '\n'
		0xee,       // out dx, al
		0xeb, 0xf3, // jmp line
	})
	copy(fw[0xfff0:], []byte{0xe9, 0x0d, 0xff}) // reset vector: jmp 0xff00
	spec.Boot.FirmwareCode = filepath.Join(spec.Dir, "flood.fd")
	spec.Boot.FirmwareVars = filepath.Join(spec.Dir, "vars.fd")
	if err := os.WriteFile(spec.Boot.FirmwareCode, fw, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(spec.Boot.FirmwareVars, make([]byte, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	return spec
}

// TestConsoleIsCapped floods the serial console: the node keeps copying
// it into a file that stays under its cap, and after the node has been
// away (the guest going on writing into QEMU's ring buffer), a new node
// picks it up again.
func TestConsoleIsCapped(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	const maxSize = 256 << 10
	d, err := New(context.Background(), Options{Accel: "tcg", ConsoleMaxSize: maxSize}, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	spec := floodVM(t)
	vm, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if (&VM{dir: spec.Dir, pid: vm.Pid()}).isOurs() {
			_ = syscall.Kill(vm.Pid(), syscall.SIGKILL)
		}
	})
	console := vm.ConsoleLog()
	held := func() (int64, string) {
		// Both files: right after a rotation the live one may be empty.
		var total int64
		var data []byte
		for _, p := range []string{console, console + ".1"} {
			if st, err := os.Stat(p); err == nil {
				total += st.Size()
			}
			b, _ := os.ReadFile(p)
			data = append(data, b...)
		}
		return total, string(data)
	}
	rotations := func() uint64 {
		st, err := os.Stat(console + ".1")
		if err != nil {
			return 0
		}
		return st.Sys().(*syscall.Stat_t).Ino
	}
	deadline := time.Now().Add(30 * time.Second)
	for rotations() == 0 {
		if time.Now().After(deadline) {
			total, _ := held()
			t.Fatalf("the console was never rotated (%d bytes held)", total)
		}
		if total, _ := held(); total > maxSize {
			t.Fatalf("the console holds %d bytes, over its cap of %d", total, maxSize)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, data := held(); !strings.Contains(data, strings.Repeat("A", 64)+"\n") {
		t.Errorf("the console does not hold the guest's lines: %q", data[:min(len(data), 200)])
	}

	// The node goes away; the guest writes on into the ring.
	vm.Close()
	before := rotations()
	time.Sleep(time.Second)
	if rotations() != before {
		t.Error("the console was rotated while no node copied it")
	}
	again, err := d.Attach(ctx, spec.Dir)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	deadline = time.Now().Add(30 * time.Second)
	for rotations() == before {
		if time.Now().After(deadline) {
			t.Fatal("the console is not copied after the node came back")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if total, _ := held(); total > maxSize {
		t.Errorf("the console holds %d bytes, over its cap of %d", total, maxSize)
	}
	if st, err := again.QMP().Status(ctx); err != nil || st != "running" {
		t.Errorf("guest status %q, %v", st, err)
	}
}
