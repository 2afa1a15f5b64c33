package execution

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
)

type namedBackend string

func (n namedBackend) Name() string { return string(n) }
func (namedBackend) Start(context.Context, hypervisor.Spec) (VM, error) {
	return nil, errors.New("no")
}
func (namedBackend) Attach(context.Context, string) (VM, error) { return nil, errors.New("no") }

func TestHypervisorsGet(t *testing.T) {
	hvs := Hypervisors{hypervisor.QEMU: namedBackend(hypervisor.QEMU)}
	if hv, err := hvs.Get(hypervisor.QEMU); err != nil || hv.Name() != hypervisor.QEMU {
		t.Errorf("qemu: %v %v", hv, err)
	}
	_, err := hvs.Get(hypervisor.Firecracker)
	var e *Error
	if !errors.As(err, &e) || e.Status != 503 || !strings.Contains(err.Error(), "does not run firecracker") {
		t.Errorf("firecracker: %v", err)
	}
}

func TestKernelBoot(t *testing.T) {
	k := Kernel{Kernel: "bz", Vmlinux: "elf", Initrd: "initrd", Cmdline: "console=ttyS0"}
	for hv, want := range map[string]string{hypervisor.QEMU: "bz", hypervisor.Firecracker: "elf"} {
		if b, err := k.Boot(hv); err != nil || b.Kernel != want || b.Initrd != "initrd" || b.Cmdline != "console=ttyS0" {
			t.Errorf("%s: %+v %v", hv, b, err)
		}
	}
	if _, err := (Kernel{Kernel: "bz", Initrd: "initrd"}).Boot(hypervisor.Firecracker); err == nil {
		t.Error("firecracker booted a bzImage")
	}
}
