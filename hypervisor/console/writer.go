// Package console keeps a VM's serial console on disk, capped and rotated
// (console.log, then console.log.1 for the half before), whatever produces
// it: QEMU's ring buffer read over QMP, or Firecracker's stdout pipe. It
// reads a console back in bounded memory, however large the file.
//
// The hypervisor never writes the file itself: the node copies the output
// from a buffer that drops the oldest (QEMU) or newest (Firecracker) bytes
// when nobody reads it, so a guest never blocks on its console, the file
// never grows past its cap, and output written while the node is down is
// lost past the buffer's size (docs/hypervisor.md).
package console

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// DefaultMaxSize is what a console keeps on disk when no size is given.
const DefaultMaxSize = 4 << 20

// MinMaxSize is the smallest cap accepted.
const MinMaxSize = 64 << 10

// Rotated is the name of a console's older half: the file's name with
// this suffix.
const Rotated = ".1"

// Writer appends to a console file, keeping at most maxSize bytes in it
// and its rotated half together. It is safe for concurrent use.
type Writer struct {
	path string
	half int64

	mu   sync.Mutex
	f    *os.File
	size int64
}

// OpenWriter opens the console at path for appending. A file larger than
// half of maxSize (left by an older node, or a smaller cap) is rotated at
// once, keeping only its end. maxSize 0 means DefaultMaxSize.
func OpenWriter(path string, maxSize int64) (*Writer, error) {
	if maxSize == 0 {
		maxSize = DefaultMaxSize
	}
	if maxSize < MinMaxSize {
		return nil, fmt.Errorf("console %s: cap %d bytes is below the minimum of %d", path, maxSize, MinMaxSize)
	}
	w := &Writer{path: path, half: maxSize / 2}
	if err := w.open(); err != nil {
		return nil, err
	}
	if w.size > w.half {
		if err := w.rotate(); err != nil {
			w.f.Close()
			return nil, err
		}
	}
	return w, nil
}

func (w *Writer) open() error {
	f, err := os.OpenFile(w.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open console: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open console: %w", err)
	}
	w.f, w.size = f, st.Size()
	return nil
}

// Write appends p, rotating the file whenever it would pass half the cap.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return 0, os.ErrClosed
	}
	written := 0
	for len(p) > 0 {
		if w.size >= w.half {
			if err := w.rotate(); err != nil {
				return written, err
			}
		}
		chunk := p[:min(int64(len(p)), w.half-w.size)]
		n, err := w.f.Write(chunk)
		w.size += int64(n)
		written += n
		if err != nil {
			return written, fmt.Errorf("write console: %w", err)
		}
		p = p[n:]
	}
	return written, nil
}

// rotate makes the current file the rotated half and starts a new one. A
// current file larger than half the cap gives only its end.
func (w *Writer) rotate() error {
	if err := w.f.Close(); err != nil {
		return fmt.Errorf("rotate console: %w", err)
	}
	w.f = nil
	var err error
	if w.size > w.half {
		err = keepTail(w.path, w.path+Rotated, w.half)
	} else {
		err = os.Rename(w.path, w.path+Rotated)
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rotate console: %w", err)
	}
	if err := os.Truncate(w.path, 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rotate console: %w", err)
	}
	return w.open()
}

// keepTail writes the last n bytes of src to dst (through a temporary file
// and a rename) and empties src.
func keepTail(src, dst string, n int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, io.NewSectionReader(in, max(0, st.Size()-n), n))
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// Close closes the file.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}
