package qemu

import (
	"context"
	"encoding/base64"
	"errors"
	"path/filepath"
	"time"

	"github.com/alephvm/alephvm/hypervisor/console"
)

// The guest's serial console goes to a ring buffer in QEMU (a chardev
// that never blocks the guest and never grows), which the node reads over
// QMP into the VM's capped console file. What the guest writes while the
// node is down survives up to ConsoleRingSize bytes: older output is
// overwritten.
const (
	// ConsoleRingSize is the size of QEMU's console ring buffer (a power
	// of two).
	ConsoleRingSize = 1 << 20
	// consoleChunk is the most read in one ringbuf-read.
	consoleChunk = 64 << 10
	// consolePoll is how often a quiet console is read. The ring holds
	// ConsoleRingSize bytes: a guest must write more than 5 MB/s for the
	// node to lose output while it runs.
	consolePoll = 200 * time.Millisecond
)

// consoleDevice is the id of the console chardev on the command line.
const consoleDevice = "console"

// pumpConsole copies the guest's console from QEMU's ring buffer to the
// VM's console file until QEMU exits or the handle is closed.
func (vm *VM) pumpConsole(maxSize int64) {
	defer close(vm.pumped)
	w, err := console.OpenWriter(filepath.Join(vm.dir, ConsoleLog), maxSize)
	if err != nil {
		vm.log.Error("vm console: output not kept", "dir", vm.dir, "err", err)
		return
	}
	defer w.Close()
	for {
		data, err := vm.readConsole()
		if err != nil {
			select {
			case <-vm.closing:
			case <-vm.done:
			default:
				var qerr *QMPError
				switch {
				case errors.As(err, &qerr):
					vm.log.Warn("vm console: output not kept (a VM started by an older node writes its console.log itself)", "dir", vm.dir, "err", err)
				case !errors.Is(err, ErrVMGone):
					vm.log.Error("vm console: output no longer kept", "dir", vm.dir, "err", err)
				}
			}
			return
		}
		if len(data) > 0 {
			if _, err := w.Write(data); err != nil {
				vm.log.Warn("vm console: output lost", "dir", vm.dir, "bytes", len(data), "err", err)
			}
		}
		if len(data) == consoleChunk {
			continue // more is waiting
		}
		select {
		case <-vm.closing:
			return
		case <-vm.done:
			return
		case <-time.After(consolePoll):
		}
	}
}

// readConsole takes what the ring buffer holds, up to consoleChunk bytes.
func (vm *VM) readConsole() ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var data string
	err := vm.qmp.Execute(ctx, "ringbuf-read", map[string]any{"device": consoleDevice, "size": consoleChunk, "format": "base64"}, &data)
	if err != nil {
		return nil, err
	}
	return base64.StdEncoding.DecodeString(data)
}
