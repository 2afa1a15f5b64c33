package hypervisor

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

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
