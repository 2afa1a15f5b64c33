package program

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

func testRef(i int) message.ItemHash {
	return message.ItemHash(fmt.Sprintf("%064x", i))
}

func texts(lines []guest.LogLine) string {
	var out []string
	for _, l := range lines {
		out = append(out, fmt.Sprintf("%d:%s", l.Seq, l.Text))
	}
	return strings.Join(out, " ")
}

func heapMiB() float64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapAlloc) / (1 << 20)
}

// The buffer keeps the newest lines within its line and byte bounds, as a
// naive list would.
func TestLogBufferMatchesAModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 50 {
		a := NewLogArchive(1 + rng.IntN(20))
		a.bytes = 200 + rng.IntN(2000)
		b := a.Start(testRef(round))
		var model []guest.LogLine
		for i := range 300 {
			l := guest.LogLine{Stream: guest.Stdout, Text: strings.Repeat("x", rng.IntN(300)) + fmt.Sprint(i)}
			b.Add(l)
			l.Seq = uint64(i + 1)
			model = append(model, l)
			bytes := 0
			for _, m := range model {
				bytes += lineCost(m)
			}
			for len(model) > a.lines || (bytes > a.bytes && len(model) > 1) {
				bytes -= lineCost(model[0])
				model = model[1:]
			}
			if got, want := texts(b.Tail(1000)), texts(model); got != want {
				t.Fatalf("round %d line %d: kept %s\nwant %s", round, i, got, want)
			}
			if got, want := texts(b.Tail(2)), texts(model[max(0, len(model)-2):]); got != want {
				t.Fatalf("tail 2: %s, want %s", got, want)
			}
		}
	}
}

// A hostile line is cut, on a rune boundary.
func TestLogBufferCutsLongLines(t *testing.T) {
	b := NewLogArchive(10).Start(testRef(1))
	b.Add(guest.LogLine{Text: "é" + strings.Repeat("€", 5<<20)})
	l := b.Tail(1)[0]
	if len(l.Text) > MaxLogText || !utf8.ValidString(l.Text) {
		t.Errorf("kept a line of %d bytes (valid UTF-8: %v)", len(l.Text), utf8.ValidString(l.Text))
	}
}

// A million lines through a followed buffer: memory stays within the
// buffer's bounds, the follower sees the lines in order (with gaps for
// those dropped before it read them) and returns once the VM is gone.
func TestLogBufferMillionLines(t *testing.T) {
	n := 1_000_000
	if testing.Short() {
		n = 100_000
	}
	before := heapMiB()
	a := NewLogArchive(1000)
	b := a.Start(testRef(1))
	type result struct {
		calls  int
		ended  bool
		sorted bool
	}
	followed := make(chan result)
	go func() {
		var r result
		var last uint64
		r.sorted = true
		r.ended, _ = b.Follow(context.Background(), func(l guest.LogLine) error {
			r.calls++
			r.sorted = r.sorted && l.Seq > last
			last = l.Seq
			return nil
		})
		followed <- r
	}()
	for i := range n {
		b.Add(guest.LogLine{Stream: guest.Stdout, Text: fmt.Sprintf("line %d %s", i, strings.Repeat("p", i%200))})
	}
	mid := heapMiB()
	a.Finish(testRef(1), b)
	var r result
	select {
	case r = <-followed:
	case <-time.After(time.Minute):
		t.Fatal("the follower did not return after the VM ended")
	}
	t.Logf("%d lines added, %d seen by the follower; heap %.1f -> %.1f MiB", n, r.calls, before, mid)
	if !r.ended || !r.sorted || r.calls == 0 || r.calls > n {
		t.Errorf("follower %+v", r)
	}
	if got := len(b.Tail(n)); got != 1000 {
		t.Errorf("kept %d lines, want 1000", got)
	}
	if mid-before > 16 {
		t.Errorf("live heap grew by %.1f MiB", mid-before)
	}
}

// Past the total, stopped programs' buffers go first, then the oldest
// lines of the largest running one; the number of stopped programs kept
// is bounded too.
func TestLogArchiveTotalBound(t *testing.T) {
	a := NewLogArchive(100)
	a.bytes = 10_000
	a.totalBytes = 50_000
	a.maxEnded = 3
	line := guest.LogLine{Text: strings.Repeat("t", 936)} // 1000 bytes with its cost
	fill := func(b *LogBuffer, lines int) {
		for range lines {
			b.Add(line)
		}
	}
	// Ten stopped programs: only the last three are kept.
	for i := range 10 {
		b := a.Start(testRef(i))
		fill(b, 5)
		a.Finish(testRef(i), b)
	}
	if a.Get(testRef(6)) != nil || a.Get(testRef(7)) == nil || a.ended.Len() != 3 {
		t.Errorf("stopped programs kept: %d, program 6 kept %v", a.ended.Len(), a.Get(testRef(6)) != nil)
	}
	// Running programs fill the archive: the stopped ones go first.
	running := make([]*LogBuffer, 5)
	for i := range running {
		running[i] = a.Start(testRef(100 + i))
		fill(running[i], 10)
	}
	if a.Get(testRef(7)) != nil || a.ended.Len() != 0 {
		t.Errorf("a stopped program's output outlived the room running ones need")
	}
	if a.total > a.totalBytes {
		t.Errorf("total %d past %d", a.total, a.totalBytes)
	}
	// One more running program: the others' oldest lines make room, and
	// every byte counted is one held.
	late := a.Start(testRef(200))
	fill(late, 10)
	var held int64
	for _, b := range a.bufs {
		b.mu.Lock()
		held += int64(b.bytes)
		b.mu.Unlock()
		if b.counted != int64(b.bytes) {
			t.Errorf("%s: counted %d, holds %d", b.ref[:4], b.counted, b.bytes)
		}
	}
	if held != a.total || a.total > a.totalBytes {
		t.Errorf("total %d, held %d, bound %d", a.total, held, a.totalBytes)
	}
	if len(late.Tail(100)) == 0 {
		t.Error("the new program kept nothing")
	}
}

// A program's new VM replaces its last one's buffer: the old one no longer
// counts, whatever it is still sent.
func TestLogArchiveRestart(t *testing.T) {
	a := NewLogArchive(100)
	old := a.Start(testRef(1))
	old.Add(guest.LogLine{Text: "old"})
	fresh := a.Start(testRef(1))
	old.Add(guest.LogLine{Text: "late"})
	fresh.Add(guest.LogLine{Text: "new"})
	a.Finish(testRef(1), old) // the old VM's cleanup comes last
	if a.Get(testRef(1)) != fresh || a.ended.Len() != 0 {
		t.Error("the old VM's end replaced the new one's buffer")
	}
	if a.total != int64(lineCost(guest.LogLine{Text: "new"})) {
		t.Errorf("total %d counts the old VM's lines", a.total)
	}
}

// The output of a stopped program is read back after a restart of the
// node (a new archive over the same directory), within the bounds.
func TestLogArchiveSavesStoppedPrograms(t *testing.T) {
	dir := t.TempDir()
	a := NewLogArchive(100)
	a.maxEnded = 3
	if err := a.SaveTo(dir); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	for i := range 5 {
		b := a.Start(testRef(i))
		for j := range 150 { // more than the buffer keeps
			b.Add(guest.LogLine{Time: at, Stream: "stdout", Text: fmt.Sprintf("line %d of %d", j, i)})
		}
		b.System("program ended: exited with code 3")
		a.Finish(testRef(i), b)
		time.Sleep(10 * time.Millisecond) // the files' times tell the oldest
	}
	running := a.Start(testRef(9))
	running.Add(guest.LogLine{Text: "still running"})
	files, _ := filepath.Glob(filepath.Join(dir, "*"))
	if len(files) != 3 {
		t.Fatalf("files kept: %v", files)
	}
	if st, err := os.Stat(filepath.Join(dir, string(testRef(4))+".log")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("log file: %v %v", st, err)
	}

	restarted := NewLogArchive(100)
	restarted.maxEnded = 3
	restarted.SaveTo(dir)
	b := restarted.Get(testRef(4))
	if b == nil {
		t.Fatal("a stopped program's output is gone after a restart")
	}
	lines := b.Tail(1000)
	if len(lines) != 100 || lines[0].Text != "line 51 of 4" || !lines[0].Time.Equal(at) || lines[0].Stream != "stdout" ||
		lines[99].Text != "program ended: exited with code 3" || lines[99].Stream != SystemStream {
		t.Errorf("read back %d lines: first %+v, last %+v", len(lines), lines[0], lines[len(lines)-1])
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if ended, err := b.Follow(ctx, func(guest.LogLine) error { return nil }); !ended || err != nil {
		t.Errorf("follow of a stopped program's output: ended %v, %v", ended, err)
	}
	for _, gone := range []message.ItemHash{testRef(1), testRef(9), "../../etc/passwd", message.ItemHash(strings.Repeat("a", 64) + "/x")} {
		if restarted.Get(gone) != nil {
			t.Errorf("%s: output found", gone)
		}
	}

	// A damaged file: its good lines are read, within the bounds.
	path := filepath.Join(dir, string(testRef(7))+".log")
	os.WriteFile(path, []byte(`{"t":"2026-01-02T03:04:05Z","s":"stderr","m":"kept"}`+"\nnot json\n"+strings.Repeat("x", 10<<20)+"\n"), 0o600)
	if b := restarted.Get(testRef(7)); b == nil || texts(b.Tail(10)) != "1:kept" {
		t.Errorf("damaged file: %v", b)
	}
}
