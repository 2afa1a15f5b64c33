package hypervisor

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// StopTimeouts bound each step of a backend's Stop, from the gentlest. A
// zero duration skips its step.
type StopTimeouts struct {
	// Halt is the guest init's own clean shutdown (programs), asked over
	// the control channel.
	Halt time.Duration
	// Shutdown is the guest system's: the ACPI power button under QEMU,
	// ctrl-alt-del under Firecracker (systemd reboots, which ends it).
	Shutdown time.Duration
	// Quit is the hypervisor's own clean exit: QMP quit under QEMU, which
	// flushes its caches. Firecracker has none and skips it.
	Quit time.Duration
	Kill time.Duration // SIGKILL
}

// DefaultStopTimeouts suit an instance that shuts down through systemd.
var DefaultStopTimeouts = StopTimeouts{Halt: 30 * time.Second, Shutdown: 30 * time.Second, Quit: 10 * time.Second, Kill: 5 * time.Second}

// ConsoleLog is the file, in a VM's runtime directory, that receives the
// guest's serial console under every backend.
const ConsoleLog = "console.log"

// StopStep is one way of ending a VM, from the gentlest: Act asks, and
// the VM has Timeout to be gone. A nil Act or a zero Timeout skips it.
type StopStep struct {
	Name    string
	Timeout time.Duration
	Act     func(context.Context) error
}

// Escalate runs the steps in turn until done is closed, each with its
// deadline, and returns nil once it is. vm names the VM in errors and
// logs. The backends' Stop methods are built on it.
func Escalate(ctx context.Context, vm string, done <-chan struct{}, steps []StopStep, log *slog.Logger) error {
	for _, step := range steps {
		select {
		case <-done:
			return nil
		default:
		}
		if step.Act == nil || step.Timeout <= 0 {
			continue
		}
		stepCtx, cancel := context.WithTimeout(ctx, step.Timeout)
		err := step.Act(stepCtx)
		if err == nil {
			select {
			case <-done:
			case <-stepCtx.Done():
				err = fmt.Errorf("still running after %s", step.Timeout)
			}
		}
		cancel()
		select {
		case <-done:
			log.Info("vm stopped", "vm", vm, "by", step.Name)
			return nil
		default:
		}
		if ctx.Err() != nil {
			return fmt.Errorf("stop vm %s: %w", vm, ctx.Err())
		}
		log.Warn("vm stop step failed, escalating", "vm", vm, "step", step.Name, "err", err)
	}
	select {
	case <-done:
		return nil
	default:
		return fmt.Errorf("stop vm %s: still running after every step", vm)
	}
}
