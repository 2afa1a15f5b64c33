package testassets

import (
	"context"
	"os"
	"os/exec"
	"testing"

	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/internal/testenv"
)

// Firecracker is what a test that boots real Firecracker VMs runs.
type Firecracker struct {
	Binary string
	Jailer string // empty when no jailer is installed: the VMs run unjailed
}

// RequireFirecracker skips a test unless this host really boots
// Firecracker guests: /dev/kvm that runs ordinary guests (QEMU's probe)
// and a firecracker binary in PATH. The machine this project is developed
// on has neither (its KVM runs no ordinary guest), so there these tests
// always skip, saying which is missing.
func RequireFirecracker(t testing.TB) Firecracker {
	t.Helper()
	testenv.RequireIsolatedRoot(t)
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm: Firecracker cannot boot a guest here")
	}
	testenv.RequireTools(t, "qemu-system-x86_64") // for the KVM probe
	if !qemu.KVMUsable(context.Background(), "qemu-system-x86_64") {
		t.Skip("/dev/kvm runs no ordinary guest here (a probe guest failed under it): Firecracker cannot boot one")
	}
	fc, err := exec.LookPath("firecracker")
	if err != nil {
		t.Skipf("no firecracker binary in PATH: install Firecracker %s's release to boot guests", firecracker.Version)
	}
	jailer, _ := exec.LookPath("jailer")
	return Firecracker{Binary: fc, Jailer: jailer}
}
