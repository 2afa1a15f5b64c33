package program

import (
	"container/list"
	"context"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

// SystemStream marks lines the node adds to a program's output (why it
// stopped, say).
const SystemStream guest.Stream = "system"

// The bounds of a LogArchive besides its lines per program. The output of
// programs is the guest's to choose, so every bound is in bytes as well
// as in lines: per program, for all programs together, and on the number
// of stopped programs whose output is kept.
const (
	// MaxLogText cuts longer lines (the client already cuts the guest's
	// lines to guest.MaxLogText).
	MaxLogText = guest.MaxLogText
	// DefaultLogBytes is what one program's buffer holds at most.
	DefaultLogBytes = 1 << 20
	// DefaultLogTotalBytes is what all buffers hold together: past it, the
	// buffers of stopped programs go first, oldest first, then the oldest
	// lines of the largest running ones.
	DefaultLogTotalBytes = 256 << 20
	// DefaultLogEnded is how many stopped programs' buffers are kept.
	DefaultLogEnded = 1024
	// logLineCost is what a kept line counts for besides its text.
	logLineCost = 64
)

// LogArchive keeps the recent output of each program, running or stopped,
// so that the logs of a program that crashed still say why. It holds at
// most lines and bytes lines and bytes per program, totalBytes for all
// programs and the buffers of maxEnded stopped programs.
type LogArchive struct {
	lines, bytes int
	totalBytes   int64
	maxEnded     int

	mu    sync.Mutex
	bufs  map[message.ItemHash]*LogBuffer
	total int64      // bytes counted for the buffers in bufs
	ended *list.List // of *LogBuffer in bufs whose VM is gone, oldest first

	// dir, when set, keeps the output of stopped programs across node
	// restarts (logfiles.go); diskMu serializes its writes.
	dir    string
	diskMu sync.Mutex
}

// NewLogArchive keeps up to lines lines per program, within the default
// byte bounds.
func NewLogArchive(lines int) *LogArchive {
	if lines <= 0 {
		lines = 1000
	}
	return &LogArchive{lines: lines, bytes: DefaultLogBytes, totalBytes: DefaultLogTotalBytes, maxEnded: DefaultLogEnded,
		bufs: map[message.ItemHash]*LogBuffer{}, ended: list.New()}
}

// Start opens the buffer of a program's new VM, replacing the last one's.
func (a *LogArchive) Start(ref message.ItemHash) *LogBuffer {
	b := &LogBuffer{ref: ref, archive: a, maxLines: a.lines, maxBytes: a.bytes, wake: make(chan struct{})}
	a.mu.Lock()
	defer a.mu.Unlock()
	if old := a.bufs[ref]; old != nil {
		a.removeLocked(old)
	}
	a.bufs[ref] = b
	return b
}

// Finish marks a VM's buffer as complete: followers see its end. The
// buffer is kept among the stopped programs' until the archive needs the
// room.
func (a *LogArchive) Finish(_ message.ItemHash, b *LogBuffer) {
	b.end()
	a.mu.Lock()
	if a.bufs[b.ref] != b || b.endedAt != nil {
		a.mu.Unlock()
		return
	}
	a.endLocked(b)
	a.mu.Unlock()
	a.save(b)
}

func (a *LogArchive) endLocked(b *LogBuffer) {
	b.endedAt = a.ended.PushBack(b)
	for a.ended.Len() > a.maxEnded {
		a.removeLocked(a.ended.Front().Value.(*LogBuffer))
	}
}

// Get returns the buffer of a program's current or last VM, or nil. A
// stopped program's output no longer in memory is read back from its
// file, when the archive keeps them.
func (a *LogArchive) Get(ref message.ItemHash) *LogBuffer {
	a.mu.Lock()
	b := a.bufs[ref]
	a.mu.Unlock()
	if b != nil || a.dir == "" {
		return b
	}
	return a.load(ref)
}

// removeLocked forgets b: its followers keep it, the archive no longer
// counts it.
func (a *LogArchive) removeLocked(b *LogBuffer) {
	if a.bufs[b.ref] == b {
		delete(a.bufs, b.ref)
	}
	if b.endedAt != nil {
		a.ended.Remove(b.endedAt)
		b.endedAt = nil
	}
	a.total -= b.counted
	b.counted = 0
	b.removed = true
}

// grew counts delta more bytes for b, and makes room when the total is
// past its bound: stopped programs' buffers first, oldest first, then
// the oldest lines of b when it holds more than its share of the room,
// else of the largest buffer.
func (a *LogArchive) grew(b *LogBuffer, delta int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if b.removed {
		return
	}
	b.counted += int64(delta)
	a.total += int64(delta)
	for a.total > a.totalBytes && a.ended.Len() > 0 {
		a.removeLocked(a.ended.Front().Value.(*LogBuffer))
	}
	if a.total <= a.totalBytes {
		return
	}
	// Free a little more than needed, so that the next lines do not each
	// trim again.
	excess := a.total - a.totalBytes + a.totalBytes/64
	victim := b
	if b.counted <= a.totalBytes/int64(len(a.bufs)) {
		for _, o := range a.bufs {
			if o.counted > victim.counted {
				victim = o
			}
		}
	}
	freed := int64(victim.trim(victim.counted - excess))
	victim.counted -= freed
	a.total -= freed
}

// LogBuffer holds the last lines of one VM's output, within a number of
// lines and of bytes. Sequence numbers are contiguous: the first kept line
// is next-len(lines)+1.
type LogBuffer struct {
	ref      message.ItemHash
	archive  *LogArchive
	maxLines int
	maxBytes int

	mu    sync.Mutex
	lines []guest.LogLine // a ring of up to maxLines lines from head
	head  int
	n     int
	bytes int
	next  uint64        // sequence of the last line added
	ended bool          // the VM is gone: no more lines
	wake  chan struct{} // closed and replaced when a line arrives

	// Under the archive's lock.
	counted int64         // bytes the archive counts for this buffer
	endedAt *list.Element // in the archive's ended list
	removed bool          // the archive no longer counts it
}

func lineCost(l guest.LogLine) int { return len(l.Text) + logLineCost }

// Add appends a line of the workload's output.
func (b *LogBuffer) Add(l guest.LogLine) {
	if len(l.Text) > MaxLogText {
		i := MaxLogText
		for i > 0 && !utf8.RuneStart(l.Text[i]) {
			i--
		}
		l.Text = strings.Clone(l.Text[:i])
	}
	b.mu.Lock()
	if b.ended {
		b.mu.Unlock()
		return
	}
	b.next++
	l.Seq = b.next
	delta := 0
	if b.n >= b.maxLines {
		delta -= b.dropOldestLocked()
	}
	if b.n == len(b.lines) {
		// The ring is full but below maxLines: grow it, in order.
		if b.head != 0 {
			b.lines = slices.Concat(b.lines[b.head:], b.lines[:b.head])
			b.head = 0
		}
		b.lines = append(b.lines, l)
	} else {
		b.lines[(b.head+b.n)%len(b.lines)] = l
	}
	b.n++
	delta += lineCost(l)
	b.bytes += lineCost(l)
	for b.bytes > b.maxBytes && b.n > 1 {
		delta -= b.dropOldestLocked()
	}
	close(b.wake)
	b.wake = make(chan struct{})
	b.mu.Unlock()
	if b.archive != nil {
		b.archive.grew(b, delta)
	}
}

// dropOldestLocked drops the oldest line and returns its cost.
func (b *LogBuffer) dropOldestLocked() int {
	cost := lineCost(b.lines[b.head])
	b.lines[b.head] = guest.LogLine{}
	b.head = (b.head + 1) % len(b.lines)
	b.n--
	b.bytes -= cost
	return cost
}

// trim drops the oldest lines until the buffer holds at most keep bytes
// (keeping its last line), and returns the bytes freed.
func (b *LogBuffer) trim(keep int64) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	freed := 0
	for int64(b.bytes) > keep && b.n > 1 {
		freed += b.dropOldestLocked()
	}
	return freed
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

// sinceLocked returns a copy of the kept lines after sequence seen.
func (b *LogBuffer) sinceLocked(seen uint64) []guest.LogLine {
	first := b.next - uint64(b.n) + 1 // sequence of the oldest kept line
	skip := 0
	if seen >= first {
		skip = int(min(seen-first+1, uint64(b.n)))
	}
	out := make([]guest.LogLine, 0, b.n-skip)
	for i := skip; i < b.n; i++ {
		out = append(out, b.lines[(b.head+i)%len(b.lines)])
	}
	return out
}

// Tail returns the last n lines.
func (b *LogBuffer) Tail(n int) []guest.LogLine {
	b.mu.Lock()
	defer b.mu.Unlock()
	n = min(max(n, 0), b.n)
	return b.sinceLocked(b.next - uint64(n))
}

// Follow calls fn with every line kept, then with each new one, until the
// VM is gone, fn fails or ctx ends. It reports whether the VM is gone.
// Lines dropped before fn saw them show as a gap in Seq.
func (b *LogBuffer) Follow(ctx context.Context, fn func(guest.LogLine) error) (ended bool, err error) {
	var seen uint64
	for {
		b.mu.Lock()
		batch := b.sinceLocked(seen)
		seen = b.next
		wake, done := b.wake, b.ended
		b.mu.Unlock()
		for _, l := range batch {
			if err := fn(l); err != nil {
				return false, err
			}
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
