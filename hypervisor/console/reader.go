package console

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"syscall"
	"time"
)

// Limits bound what Follow reads and holds.
type Limits struct {
	// Past is how many bytes from the end of the console (its rotated half
	// included) are sent before following it.
	Past int64
	// MaxLine bounds a line: a longer one is cut into lines of this size.
	MaxLine int
	// Poll is how often a console that reached its end is looked at again.
	Poll time.Duration
}

// DefaultLimits send the last MiB of a console in lines of at most 16 KiB.
var DefaultLimits = Limits{Past: 1 << 20, MaxLine: 16 << 10, Poll: 200 * time.Millisecond}

// Follow calls fn with the lines of the last Past bytes of the console at
// path, then with the lines written to it (across rotations) while
// running() holds, until ctx ends or fn fails. It reports whether the
// console's VM stopped. It holds one line and one read buffer at a time,
// whatever the size of the file.
func Follow(ctx context.Context, path string, lim Limits, running func() bool, fn func(string) error) (ended bool, err error) {
	if lim.Past <= 0 {
		lim.Past = DefaultLimits.Past
	}
	if lim.MaxLine <= 0 {
		lim.MaxLine = DefaultLimits.MaxLine
	}
	if lim.Poll <= 0 {
		lim.Poll = DefaultLimits.Poll
	}
	wait := func() error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(lim.Poll):
			return nil
		}
	}
	lines := &splitter{buf: make([]byte, 0, lim.MaxLine), fn: fn}
	buf := make([]byte, 32<<10)

	var cur *os.File
	for cur == nil {
		if cur, err = os.Open(path); err == nil {
			break
		}
		if !errors.Is(err, os.ErrNotExist) {
			return false, err
		}
		if !running() {
			return true, nil
		}
		if err := wait(); err != nil {
			return false, err
		}
	}
	defer func() { cur.Close() }()

	// The past: the end of the rotated half, then of the current file.
	st, err := cur.Stat()
	if err != nil {
		return false, err
	}
	if need := lim.Past - st.Size(); need > 0 {
		if err := sendTail(path+Rotated, need, buf, lines); err != nil {
			return false, err
		}
	}
	if _, err := cur.Seek(max(0, st.Size()-lim.Past), io.SeekStart); err != nil {
		return false, err
	}

	for {
		n, err := cur.Read(buf)
		if n > 0 {
			if err := lines.write(buf[:n]); err != nil {
				return false, err
			}
		}
		if err == nil {
			continue
		}
		if !errors.Is(err, io.EOF) {
			return false, err
		}
		switch next, err := reopened(cur, path); {
		case err != nil:
			return false, err
		case next != nil:
			// Rotated: the old file was closed before its rename, so all of
			// it has been read. A rotated half that is not it was made since:
			// it is read first.
			if err := sendMissed(cur, path+Rotated, buf, lines); err != nil {
				next.Close()
				return false, err
			}
			cur.Close()
			cur = next
			continue
		}
		if !running() {
			return true, lines.flush()
		}
		if err := wait(); err != nil {
			return false, err
		}
	}
}

// sendTail sends the last n bytes of the file at path, if it exists.
func sendTail(path string, n int64, buf []byte, lines *splitter) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	start := max(0, st.Size()-n)
	_, err = io.CopyBuffer(writerFunc(lines.write), io.NewSectionReader(f, start, st.Size()-start), buf)
	return err
}

// sendMissed sends the rotated half at path unless it is the file read.
func sendMissed(read *os.File, path string, buf []byte, lines *splitter) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	a, err := read.Stat()
	if err != nil {
		return err
	}
	b, err := f.Stat()
	if err != nil || sameFile(a, b) {
		return err
	}
	_, err = io.CopyBuffer(writerFunc(lines.write), f, buf)
	return err
}

// reopened returns the file now at path when it is no longer cur's (the
// console was rotated), or cur itself, rewound, when it was truncated; nil
// when nothing changed.
func reopened(cur *os.File, path string) (*os.File, error) {
	now, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil // between a rotation's rename and the new file
	}
	if err != nil {
		return nil, err
	}
	have, err := cur.Stat()
	if err != nil {
		return nil, err
	}
	if !sameFile(have, now) {
		return os.Open(path)
	}
	if off, err := cur.Seek(0, io.SeekCurrent); err == nil && now.Size() < off {
		if _, err := cur.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

func sameFile(a, b os.FileInfo) bool {
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// splitter cuts bytes into lines of at most cap(buf) bytes.
type splitter struct {
	buf []byte
	fn  func(string) error
}

func (s *splitter) write(p []byte) error {
	for len(p) > 0 {
		room := cap(s.buf) - len(s.buf)
		i := bytes.IndexByte(p, '\n')
		if i < 0 || i > room {
			take := min(len(p), room)
			s.buf = append(s.buf, p[:take]...)
			p = p[take:]
			if len(s.buf) == cap(s.buf) {
				if err := s.flush(); err != nil {
					return err
				}
			}
			continue
		}
		s.buf = append(s.buf, p[:i]...)
		p = p[i+1:]
		if err := s.emit(); err != nil {
			return err
		}
	}
	return nil
}

func (s *splitter) emit() error {
	line := strings.TrimSuffix(string(s.buf), "\r")
	s.buf = s.buf[:0]
	return s.fn(line)
}

// flush sends a line not ended yet.
func (s *splitter) flush() error {
	if len(s.buf) == 0 {
		return nil
	}
	return s.emit()
}

type writerFunc func([]byte) error

func (f writerFunc) Write(p []byte) (int, error) {
	if err := f(p); err != nil {
		return 0, err
	}
	return len(p), nil
}
