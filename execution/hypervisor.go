package execution

import (
	"context"
	"fmt"
	"net"

	"github.com/alephvm/alephvm/hypervisor"
)

// VM is a running VM, whatever its hypervisor.
type VM interface {
	Pid() int
	// Done is closed once the VM has exited and its backend cleaned up.
	Done() <-chan struct{}
	// ConsoleLog is the file that receives the guest's serial console.
	ConsoleLog() string
	// DialControl connects to the guest init's control channel, waiting
	// for the init to listen.
	DialControl(ctx context.Context) (net.Conn, error)
	// Stop ends the VM: halt (when given) asks the guest's init, then the
	// backend escalates within t. It returns nil once the VM is gone.
	Stop(ctx context.Context, halt func(context.Context) error, t hypervisor.StopTimeouts) error
	// Close stops watching the VM and leaves it running.
	Close()
}

// Hypervisor starts VMs of one backend and finds them again.
type Hypervisor interface {
	// Name is the backend's name: QEMU or Firecracker.
	Name() string
	Start(ctx context.Context, spec hypervisor.Spec) (VM, error)
	// Attach finds the VM whose runtime directory is dir, as after a node
	// restart; it fails when that VM no longer runs.
	Attach(ctx context.Context, dir string) (VM, error)
}

// Hypervisors are the backends a node runs, by name.
type Hypervisors map[string]Hypervisor

// Get returns the backend named name, or an error a client can act on.
func (h Hypervisors) Get(name string) (Hypervisor, error) {
	if hv, ok := h[name]; ok {
		return hv, nil
	}
	return nil, &Error{Status: 503, Msg: fmt.Sprintf("this node does not run %s VMs (see alephvm doctor)", name)}
}

// Kernel is what VMs booted directly boot: a kernel (compressed for QEMU,
// the same one uncompressed for Firecracker), its initramfs, and the
// command line.
type Kernel struct {
	Kernel  string // bzImage
	Vmlinux string // ELF
	Initrd  string
	Cmdline string
}

// Boot returns how a VM of the backend hv boots this kernel, or an error
// when the node has no image of it for hv.
func (k Kernel) Boot(hv string) (hypervisor.Boot, error) {
	image := k.Kernel
	if hv == hypervisor.Firecracker {
		image = k.Vmlinux
	}
	if image == "" || k.Initrd == "" {
		return hypervisor.Boot{}, fmt.Errorf("no kernel image for %s, or no initramfs", hv)
	}
	return hypervisor.Boot{Kernel: image, Initrd: k.Initrd, Cmdline: k.Cmdline}, nil
}
