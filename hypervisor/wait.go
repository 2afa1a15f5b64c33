package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrExited is returned by WaitFor when the hypervisor process exits
// before it answers.
var ErrExited = errors.New("the hypervisor process exited")

// WaitFor calls try until it succeeds, exited is closed or ctx ends,
// pausing a few milliseconds between tries: how a backend waits for its
// process's control socket, which exists a moment before it accepts
// connections. The error says what was awaited and the last failure.
func WaitFor(ctx context.Context, what string, exited <-chan struct{}, try func(context.Context) error) error {
	for {
		err := try(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("wait for %s: %w", what, ErrExited)
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last try: %v)", what, ctx.Err(), err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}
