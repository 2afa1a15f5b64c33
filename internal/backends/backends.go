// Package backends adapts the hypervisor drivers to execution.Hypervisor,
// where the node is wired: programs and instances use the interface and
// import no driver.
package backends

import (
	"context"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/snapshot"
)

// QEMUBackend adapts the QEMU driver.
func QEMUBackend(d *qemu.Driver) execution.Hypervisor { return backend[*qemu.VM]{hypervisor.QEMU, d} }

// QEMUTemplates adapts the QEMU driver to build program templates.
func QEMUTemplates(d *qemu.Driver) snapshot.Hypervisor { return qemuTemplates{d} }

type qemuTemplates struct{ d *qemu.Driver }

func (t qemuTemplates) AttachTemplate(ctx context.Context, dir string) (snapshot.VM, error) {
	vm, err := t.d.Attach(ctx, dir)
	if err != nil {
		return nil, err
	}
	return vm, nil
}

func (t qemuTemplates) StartTemplate(ctx context.Context, spec hypervisor.Spec) (snapshot.VM, error) {
	vm, err := t.d.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	return vm, nil
}

// FirecrackerBackend adapts the Firecracker driver.
func FirecrackerBackend(d *firecracker.Driver) execution.Hypervisor {
	return backend[*firecracker.VM]{hypervisor.Firecracker, d}
}

// driver is a backend's driver, whose VMs are of its own type V.
type driver[V execution.VM] interface {
	Start(ctx context.Context, spec hypervisor.Spec) (V, error)
	Attach(ctx context.Context, dir string) (V, error)
}

type backend[V execution.VM] struct {
	name string
	d    driver[V]
}

func (b backend[V]) Name() string { return b.name }

func (b backend[V]) Start(ctx context.Context, spec hypervisor.Spec) (execution.VM, error) {
	return orNil(b.d.Start(ctx, spec))
}

func (b backend[V]) Attach(ctx context.Context, dir string) (execution.VM, error) {
	return orNil(b.d.Attach(ctx, dir))
}

// orNil keeps a failed start's nil pointer from becoming a non-nil VM.
func orNil[V execution.VM](vm V, err error) (execution.VM, error) {
	if err != nil {
		return nil, err
	}
	return vm, nil
}
