package backends

import (
	"errors"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/qemu"
)

// A failed start's typed nil must not reach the caller as a non-nil VM.
func TestOrNil(t *testing.T) {
	vm, err := orNil[*qemu.VM](nil, errors.New("no"))
	if vm != nil || err == nil {
		t.Errorf("got %v, %v", vm, err)
	}
}

func TestNames(t *testing.T) {
	if QEMUBackend(nil).Name() != hypervisor.QEMU || FirecrackerBackend(nil).Name() != hypervisor.Firecracker {
		t.Error("backend names")
	}
}
