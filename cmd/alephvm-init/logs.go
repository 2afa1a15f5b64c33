package main

import (
	"bufio"
	"context"
	"io"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/alephvm/alephvm/guest"
)

// maxLogLine splits longer output lines.
const maxLogLine = 16 << 10

// logRing keeps the workload's last output lines, within a number of
// lines and of bytes, and wakes the readers that follow it.
type logRing struct {
	maxLines, maxBytes int

	mu    sync.Mutex
	lines []guest.LogLine
	bytes int
	seq   uint64
	wake  chan struct{} // closed and replaced on every new line
}

func newLogRing(maxLines, maxBytes int) *logRing {
	return &logRing{maxLines: maxLines, maxBytes: maxBytes, wake: make(chan struct{})}
}

func (r *logRing) add(stream guest.Stream, text string) {
	if !utf8.ValidString(text) {
		text = strings.ToValidUTF8(text, "\uFFFD")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	r.lines = append(r.lines, guest.LogLine{Seq: r.seq, Time: time.Now().UTC(), Stream: stream, Text: text})
	r.bytes += len(text)
	drop := 0
	for len(r.lines)-drop > r.maxLines || (r.bytes > r.maxBytes && len(r.lines)-drop > 1) {
		r.bytes -= len(r.lines[drop].Text)
		drop++
	}
	if drop > 0 {
		r.lines = append(r.lines[:0:0], r.lines[drop:]...)
	}
	close(r.wake)
	r.wake = make(chan struct{})
}

// copy adds the lines read from rd until it ends, and copies them to
// echo when it is not nil.
func (r *logRing) copy(stream guest.Stream, rd io.Reader, echo io.Writer) {
	br := bufio.NewReaderSize(rd, maxLogLine)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			if echo != nil {
				echo.Write(line)
			}
			r.add(stream, strings.TrimSuffix(string(line), "\n"))
		}
		if err != nil && err != bufio.ErrBufferFull {
			return
		}
	}
}

// read calls fn with the retained lines, then, with follow, with each new
// line until ctx ends. Lines dropped from the ring before a follower
// reads them show as a gap in Seq.
func (r *logRing) read(ctx context.Context, follow bool, fn func(guest.LogLine) error) error {
	var next uint64
	for {
		r.mu.Lock()
		start := 0
		if len(r.lines) > 0 && next >= r.lines[0].Seq {
			start = int(next - r.lines[0].Seq + 1) // sequence numbers are contiguous
		}
		pending := slices.Clone(r.lines[start:])
		next = r.seq
		wake := r.wake
		r.mu.Unlock()
		for _, l := range pending {
			if err := fn(l); err != nil {
				return err
			}
		}
		if !follow {
			return nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
