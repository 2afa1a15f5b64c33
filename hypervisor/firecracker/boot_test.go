package firecracker_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

// requireFirecrackerBoot skips a test unless this host really boots
// Firecracker guests (testassets.RequireFirecracker) and an x86_64 ELF
// vmlinux (Firecracker boots no bzImage) is named by
// ALEPHVM_TEST_VMLINUX.
func requireFirecrackerBoot(t *testing.T) (fc, jailer, vmlinux string) {
	t.Helper()
	bins := testassets.RequireFirecracker(t)
	vmlinux = os.Getenv("ALEPHVM_TEST_VMLINUX")
	if vmlinux == "" {
		t.Skip("set ALEPHVM_TEST_VMLINUX to an x86_64 ELF vmlinux: Firecracker boots no bzImage")
	}
	return bins.Binary, bins.Jailer, vmlinux
}

// TestBootUnderFirecracker boots a kernel and a one-file initramfs under
// the real Firecracker, jailed when a jailer is installed, sees the init
// run on the console, and stops the VM by ctrl-alt-del. This machine
// cannot run it (its KVM runs no ordinary guest and it has no
// Firecracker); it skips saying which.
func TestBootUnderFirecracker(t *testing.T) {
	fc, jailer, vmlinux := requireFirecrackerBoot(t)
	dir := t.TempDir()
	initrd := buildInitramfs(t, dir)
	opts := firecracker.Options{Firecracker: fc, Jailer: jailer, UseJailer: jailer != "", JailerBase: filepath.Join(dir, "jail"), FirstUID: 1000200}
	d, err := firecracker.New(opts, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	// Jailed, the kernel and initramfs are read as the jail's uid.
	for _, f := range []string{vmlinux, initrd} {
		os.Chmod(f, 0o644)
	}
	vmDir := filepath.Join(dir, "vm")
	os.Mkdir(vmDir, 0o700)
	spec := hypervisor.Spec{Name: "boot-test", Dir: vmDir, VCPUs: 1, MemoryMiB: 128,
		Boot: hypervisor.Boot{Kernel: vmlinux, Initrd: initrd, Cmdline: "console=ttyS0 rdinit=/init"}}
	ctx := context.Background()
	start := time.Now()
	vm, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Stop(context.Background(), nil, hypervisor.StopTimeouts{Kill: 5 * time.Second}) })
	deadline := time.Now().Add(30 * time.Second)
	for {
		console, _ := os.ReadFile(vm.ConsoleLog())
		if bytes.Contains(console, []byte("alephvm-boot-test: init ran as pid 1")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the init did not run within 30 s; console:\n%s", console)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("init ran %v after Start was called", time.Since(start).Round(time.Millisecond))
	if err := vm.Stop(ctx, nil, hypervisor.StopTimeouts{Shutdown: 10 * time.Second}); err != nil {
		t.Fatalf("ctrl-alt-del did not end the VM: %v", err)
	}
	if j := vm.Jail(); j != nil {
		if _, err := os.Stat(j.Dir); !os.IsNotExist(err) {
			t.Errorf("jail left: %v", err)
		}
	}
}

// buildInitramfs makes a newc cpio holding /dev/console (the kernel gives
// it to the init as its stdio) and testdata/bootinit as /init.
func buildInitramfs(t *testing.T, dir string) string {
	t.Helper()
	testenv.RequireTools(t, "go")
	bin := filepath.Join(dir, "init")
	cmd := exec.Command("go", "build", "-o", bin, "./testdata/bootinit")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the init: %v\n%s", err, out)
	}
	init, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	entry := func(name string, mode, rdevMajor, rdevMinor int, data []byte) {
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			b.Len(), mode, 0, 0, 1, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
		b.WriteString(name + "\x00")
		pad := func() {
			for b.Len()%4 != 0 {
				b.WriteByte(0)
			}
		}
		pad()
		b.Write(data)
		pad()
	}
	entry("dev", 0o040755, 0, 0, nil)
	entry("dev/console", 0o020600, 5, 1, nil)
	entry("init", 0o100755, 0, 0, init)
	entry("TRAILER!!!", 0, 0, 0, nil)
	path := filepath.Join(dir, "initramfs.cpio")
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestInitramfsIsNewc checks the archive against cpio itself, where it
// is installed, since the boot test cannot run here.
func TestInitramfsIsNewc(t *testing.T) {
	testenv.RequireTools(t, "cpio")
	path := buildInitramfs(t, t.TempDir())
	out, err := exec.Command("cpio", "-itv", "-F", path).CombinedOutput()
	if err != nil {
		t.Fatalf("cpio: %v\n%s", err, out)
	}
	for _, want := range []string{"dev/console", "init", "crw-------"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("cpio lists no %q:\n%s", want, out)
		}
	}
}
