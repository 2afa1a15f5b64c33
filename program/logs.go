package program

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

// SystemStream marks lines the node adds to a program's output (why it
// stopped, say).
const SystemStream guest.Stream = "system"

// Bounds of what the archive holds, whatever the guests write.
const (
	// MaxLineBytes bounds one line: a longer one is cut, and says so.
	MaxLineBytes = 16 << 10
	// MaxBufferBytes bounds the text one VM's buffer holds: its oldest
	// lines go first.
	MaxBufferBytes = 1 << 20
	// MaxEndedBuffers is how many buffers of stopped programs are kept:
	// the oldest go first.
	MaxEndedBuffers = 64
)

// LogArchive keeps the recent output of each program, running or stopped,
// so that the logs of a program that crashed still say why. It holds at
// most MaxBufferBytes per running program and per each of the last
// MaxEndedBuffers stopped ones.
type LogArchive struct {
	capacity int
	mu       sync.Mutex
	bufs     map[message.ItemHash]*LogBuffer
	ended    []endedBuffer // oldest first
}

type endedBuffer struct {
	ref message.ItemHash
	buf *LogBuffer
}

// NewLogArchive keeps up to capacity lines per program.
func NewLogArchive(capacity int) *LogArchive {
	return &LogArchive{capacity: capacity, bufs: map[message.ItemHash]*LogBuffer{}}
}

// Start opens the buffer of a program's new VM, replacing the last one's.
func (a *LogArchive) Start(ref message.ItemHash) *LogBuffer {
	b := &LogBuffer{capacity: a.capacity, wake: make(chan struct{})}
	a.mu.Lock()
	a.bufs[ref] = b
	a.mu.Unlock()
	return b
}

// Finish marks a VM's buffer as complete: followers see its end. The
// oldest stopped programs' buffers past MaxEndedBuffers are dropped.
func (a *LogArchive) Finish(ref message.ItemHash, b *LogBuffer) {
	b.end()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ended = append(a.ended, endedBuffer{ref, b})
	for len(a.ended) > MaxEndedBuffers {
		old := a.ended[0]
		a.ended = a.ended[1:]
		if a.bufs[old.ref] == old.buf {
			delete(a.bufs, old.ref)
		}
	}
}

// Get returns the buffer of a program's current or last VM, or nil.
func (a *LogArchive) Get(ref message.ItemHash) *LogBuffer {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.bufs[ref]
}

// LogBuffer holds the last lines of one VM's output.
type LogBuffer struct {
	capacity int
	mu       sync.Mutex
	lines    []guest.LogLine
	bytes    int           // of the lines' text
	next     uint64        // sequence of the next line
	ended    bool          // the VM is gone: no more lines
	wake     chan struct{} // closed and replaced when a line arrives
}

// Add appends a line of the workload's output, cut to MaxLineBytes.
func (b *LogBuffer) Add(l guest.LogLine) {
	if len(l.Text) > MaxLineBytes {
		l.Text = strings.ToValidUTF8(l.Text[:MaxLineBytes], "") + fmt.Sprintf(" [line cut: %d bytes more]", len(l.Text)-MaxLineBytes)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ended {
		return
	}
	b.next++
	l.Seq = b.next
	b.lines = append(b.lines, l)
	b.bytes += len(l.Text)
	for len(b.lines) > b.capacity || (b.bytes > MaxBufferBytes && len(b.lines) > 1) {
		b.bytes -= len(b.lines[0].Text)
		b.lines[0] = guest.LogLine{} // its text is not kept alive by the array
		b.lines = b.lines[1:]
	}
	close(b.wake)
	b.wake = make(chan struct{})
}

// System appends a line of the node's own.
func (b *LogBuffer) System(text string) {
	b.Add(guest.LogLine{Time: time.Now(), Stream: SystemStream, Text: text})
}

func (b *LogBuffer) end() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.ended {
		b.ended = true
		close(b.wake)
	}
}

// Tail returns the last n lines.
func (b *LogBuffer) Tail(n int) []guest.LogLine {
	b.mu.Lock()
	defer b.mu.Unlock()
	if n > len(b.lines) {
		n = len(b.lines)
	}
	return append([]guest.LogLine(nil), b.lines[len(b.lines)-n:]...)
}

// Follow calls fn with every line kept, then with each new one, until the
// VM is gone, fn fails or ctx ends. It reports whether the VM is gone.
func (b *LogBuffer) Follow(ctx context.Context, fn func(guest.LogLine) error) (ended bool, err error) {
	var seen uint64
	for {
		b.mu.Lock()
		var batch []guest.LogLine
		for _, l := range b.lines {
			if l.Seq > seen {
				batch = append(batch, l)
			}
		}
		wake, done := b.wake, b.ended
		b.mu.Unlock()
		for _, l := range batch {
			if err := fn(l); err != nil {
				return false, err
			}
			seen = l.Seq
		}
		if done {
			return true, nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
}
