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
	ids, _ := processIDs(fmt.Sprintf("/proc/%d/status", vm.Pid()))
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
