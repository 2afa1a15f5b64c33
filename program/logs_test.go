package program

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

// TestLogBufferIsBounded: a guest that writes huge lines, or many long
// ones, fills its buffer up to its bounds and no further.
func TestLogBufferIsBounded(t *testing.T) {
	a := NewLogArchive(1000)
	b := a.Start("ref")
	huge := strings.Repeat("é", 4<<20) // 8 MiB, the longest line the guest protocol carries
	b.Add(guest.LogLine{Time: time.Now(), Stream: "stdout", Text: huge})
	got := b.Tail(1)[0].Text
	if len(got) > MaxLineBytes+64 || !strings.Contains(got, "[line cut: ") || !strings.HasPrefix(got, "éé") {
		t.Errorf("an 8 MiB line is kept as %d bytes ending %q", len(got), got[max(0, len(got)-40):])
	}

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	line := strings.Repeat("x", 15<<10)
	for i := range 5000 {
		b.Add(guest.LogLine{Stream: "stdout", Text: fmt.Sprintf("%d %s", i, line)})
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	var held int
	var first string
	ended, _ := b.Follow(done(), func(l guest.LogLine) error {
		if first == "" {
			first = l.Text[:10]
		}
		held += len(l.Text)
		return nil
	})
	if ended || held > MaxBufferBytes {
		t.Errorf("the buffer holds %d bytes, over %d", held, MaxBufferBytes)
	}
	if !strings.HasPrefix(b.Tail(1)[0].Text, "4999 ") || strings.HasPrefix(first, "0 ") {
		t.Errorf("the buffer does not hold the latest lines: first %q", first)
	}
	if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 8<<20 {
		t.Errorf("the heap grew by %d bytes for a buffer of %d", grown, MaxBufferBytes)
	}
}

// TestLogArchiveKeepsTheLastStopped: the buffers of stopped programs past
// MaxEndedBuffers go, oldest first; a running program's stays.
func TestLogArchiveKeepsTheLastStopped(t *testing.T) {
	a := NewLogArchive(10)
	running := a.Start("running")
	for i := range MaxEndedBuffers + 10 {
		ref := message.ItemHash(fmt.Sprintf("stopped-%d", i))
		a.Finish(ref, a.Start(ref))
	}
	if a.Get("running") != running {
		t.Error("a running program's buffer was dropped")
	}
	if a.Get("stopped-0") != nil || a.Get("stopped-9") != nil {
		t.Error("the oldest stopped programs' buffers are kept")
	}
	if a.Get("stopped-10") == nil || a.Get(message.ItemHash(fmt.Sprintf("stopped-%d", MaxEndedBuffers+9))) == nil {
		t.Error("the last stopped programs' buffers were dropped")
	}
	// A program started again keeps its new buffer when its old one ages out.
	a.Finish("again", a.Start("again"))
	fresh := a.Start("again")
	for i := range MaxEndedBuffers {
		ref := message.ItemHash(fmt.Sprintf("later-%d", i))
		a.Finish(ref, a.Start(ref))
	}
	if a.Get("again") != fresh {
		t.Error("the buffer of a running program went with its earlier run's")
	}
}

func done() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}
