package firecracker

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/hypervisor/console"
)

// Firecracker's stdout, the guest's serial console, is a named pipe in the
// VM's runtime directory that the node copies into the capped console
// file. Firecracker holds the pipe open for reading and writing, so it
// never gets EPIPE when no node reads; its end is non-blocking (Firecracker
// makes it so itself, and so does the node), so when the pipe is full
// because the node is down, Firecracker drops console bytes instead of
// blocking the guest. A node that comes back opens the pipe by its name
// and goes on copying, from the last ConsolePipeSize bytes written.

// ConsoleFIFO is the named pipe of Firecracker's stdout.
const ConsoleFIFO = "console.fifo"

// ConsolePipeSize is how much console output the pipe holds while no node
// reads it.
const ConsolePipeSize = 1 << 20

// consolePipe copies a VM's console from its pipe into its console file.
type consolePipe struct {
	r    *os.File // the node's read end
	w    *os.File // Firecracker's stdout, until it runs
	done chan struct{}
	log  *slog.Logger
}

// openConsole makes the console pipe of a VM about to start and starts
// copying from it. The caller gives p.w to Firecracker as its stdout and
// calls started once it runs.
func openConsole(dir string, maxSize int64, log *slog.Logger) (*consolePipe, error) {
	path := filepath.Join(dir, ConsoleFIFO)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("console pipe: %w", err)
	}
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return nil, fmt.Errorf("console pipe: %w", err)
	}
	r, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("console pipe: %w", err)
	}
	// Read-write: opening does not wait for a reader, and Firecracker
	// holds one, so its writes never fail with EPIPE.
	w, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("console pipe: %w", err)
	}
	if _, err := unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, ConsolePipeSize); err != nil {
		log.Warn("console pipe keeps its default size", "dir", dir, "err", err)
	}
	p := &consolePipe{r: r, w: w, done: make(chan struct{}), log: log}
	if err := p.start(dir, maxSize); err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	return p, nil
}

// attachConsole goes on copying the console of a running VM. A VM started
// by an older node, whose stdout is console.log itself, has no pipe:
// ErrNotExist then.
func attachConsole(dir string, maxSize int64, log *slog.Logger) (*consolePipe, error) {
	r, err := os.OpenFile(filepath.Join(dir, ConsoleFIFO), os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("console pipe: %w", err)
	}
	p := &consolePipe{r: r, done: make(chan struct{}), log: log}
	if err := p.start(dir, maxSize); err != nil {
		r.Close()
		return nil, err
	}
	return p, nil
}

func (p *consolePipe) start(dir string, maxSize int64) error {
	out, err := console.OpenWriter(filepath.Join(dir, ConsoleLog), maxSize)
	if err != nil {
		return err
	}
	go p.copy(out)
	return nil
}

// copy moves the console to out until every writer has closed the pipe
// (Firecracker exited) or Close stops it.
func (p *consolePipe) copy(out *console.Writer) {
	defer close(p.done)
	defer out.Close()
	defer p.r.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := p.r.Read(buf)
		if n > 0 {
			if _, werr := out.Write(buf[:n]); werr != nil {
				p.log.Warn("vm console: output lost", "bytes", n, "err", werr)
			}
		}
		if err != nil {
			return // EOF, or Close
		}
	}
}

// started hands the pipe over to the Firecracker just started: its end
// is made non-blocking (the flag is shared with the child's stdout) and
// the node's copy is closed, so that the copy ends when Firecracker does.
func (p *consolePipe) started() {
	if err := unix.SetNonblock(int(p.w.Fd()), true); err != nil {
		p.log.Warn("console pipe stays blocking: a stalled node could stall the guest", "err", err)
	}
	p.closeWriter()
}

// closeWriter closes the node's copy of Firecracker's stdout.
func (p *consolePipe) closeWriter() {
	if p.w != nil {
		p.w.Close()
		p.w = nil
	}
}

// wait gives the copy up to d to reach the end of what Firecracker wrote,
// as it does once Firecracker has exited.
func (p *consolePipe) wait(d time.Duration) {
	select {
	case <-p.done:
	case <-time.After(d):
	}
}

// Close stops copying; Firecracker goes on writing into the pipe.
func (p *consolePipe) Close() {
	p.closeWriter()
	_ = p.r.SetReadDeadline(time.Now())
	<-p.done
}
