package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"
)

// incomingFD is the descriptor a restored QEMU reads its saved state from
// (the first of exec.Cmd.ExtraFiles). Debian's QEMU 7.2 has no file:
// migration, and its sandbox forbids exec:, so the state goes through
// descriptors both ways.
const incomingFD = 3

// stateTimeout bounds a save or a load of a VM's state.
const stateTimeout = time.Minute

// ignoreShared makes a migration leave out the RAM of shared file-backed
// memory: a template's RAM stays in its memory file, and the state file
// holds only the devices and the CPUs.
var ignoreShared = map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}

// loadState loads a QEMU started with -incoming defer from incomingFD and
// waits until the guest runs again.
func loadState(ctx context.Context, qmp *QMP, exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	if err := qmp.Execute(ctx, "migrate-set-capabilities", ignoreShared, nil); err != nil {
		return err
	}
	if err := qmp.Execute(ctx, "migrate-incoming", map[string]string{"uri": fmt.Sprintf("fd:%d", incomingFD)}, nil); err != nil {
		return err
	}
	if err := waitMigration(ctx, qmp, exited); err != nil {
		return fmt.Errorf("load the state: %w", err)
	}
	// The template was saved stopped, so the loaded guest is paused.
	return qmp.Execute(ctx, "cont", nil, nil)
}

// waitMigration waits for the migration under way, in or out, to end.
func waitMigration(ctx context.Context, qmp *QMP, exited <-chan struct{}) error {
	for {
		var m struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := qmp.Execute(ctx, "query-migrate", nil, &m); err != nil {
			return err
		}
		switch m.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", m.Status, m.ErrorDesc)
		}
		select {
		case <-exited:
			return errors.New("qemu exited")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// SaveState stops the guest and writes its device and CPU state to path
// (RAM left out when it is shared file-backed memory, which the file then
// holds). The guest stays stopped: the caller ends the VM.
func (vm *VM) SaveState(ctx context.Context, path string) (err error) {
	ctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	if err := vm.qmp.Execute(ctx, "stop", nil, nil); err != nil {
		return err
	}
	if err := vm.qmp.Execute(ctx, "migrate-set-capabilities", ignoreShared, nil); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("state file: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	if err := vm.qmp.ExecuteWithFile(ctx, "getfd", map[string]string{"fdname": "state"}, nil, f); err != nil {
		return err
	}
	if err := vm.qmp.Execute(ctx, "migrate", map[string]string{"uri": "fd:state"}, nil); err != nil {
		return err
	}
	if err := waitMigration(ctx, vm.qmp, nil); err != nil {
		return fmt.Errorf("save the state: %w", err)
	}
	return f.Sync()
}
