package execution

import (
	"errors"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/hypervisor/qemu"
)

func TestHypervisorsGet(t *testing.T) {
	hvs := Hypervisors{QEMU: QEMUBackend(nil)}
	if hv, err := hvs.Get(QEMU); err != nil || hv.Name() != QEMU {
		t.Errorf("qemu: %v %v", hv, err)
	}
	_, err := hvs.Get(Firecracker)
	var e *Error
	if !errors.As(err, &e) || e.Status != 503 || !strings.Contains(err.Error(), "does not run firecracker") {
		t.Errorf("firecracker: %v", err)
	}
}

// A failed start's typed nil must not reach the caller as a non-nil VM.
func TestOrNil(t *testing.T) {
	vm, err := orNil[*qemu.VM](nil, errors.New("no"))
	if vm != nil || err == nil {
		t.Errorf("got %v, %v", vm, err)
	}
}

func TestKernelBoot(t *testing.T) {
	k := Kernel{Kernel: "bz", Vmlinux: "elf", Initrd: "initrd", Cmdline: "console=ttyS0"}
	for hv, want := range map[string]string{QEMU: "bz", Firecracker: "elf"} {
		if b, err := k.Boot(hv); err != nil || b.Kernel != want || b.Initrd != "initrd" || b.Cmdline != "console=ttyS0" {
			t.Errorf("%s: %+v %v", hv, b, err)
		}
	}
	if _, err := (Kernel{Kernel: "bz", Initrd: "initrd"}).Boot(Firecracker); err == nil {
		t.Error("firecracker booted a bzImage")
	}
}
