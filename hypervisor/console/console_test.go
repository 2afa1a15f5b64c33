package console

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func size(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func TestWriterStaysUnderItsCap(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	const maxSize = MinMaxSize
	w, err := OpenWriter(path, maxSize)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var last string
	for i := range 20000 {
		last = fmt.Sprintf("line %d\n", i)
		if _, err := w.Write([]byte(last)); err != nil {
			t.Fatal(err)
		}
		if total := size(t, path) + size(t, path+Rotated); total > maxSize {
			t.Fatalf("after %d lines the console holds %d bytes, over its cap of %d", i, total, maxSize)
		}
	}
	// One write larger than the whole cap keeps its end.
	big := strings.Repeat("x", 3*maxSize) + "\nthe end\n"
	if _, err := w.Write([]byte(big)); err != nil {
		t.Fatal(err)
	}
	if total := size(t, path) + size(t, path+Rotated); total > maxSize {
		t.Errorf("after a large write the console holds %d bytes", total)
	}
	data, _ := os.ReadFile(path)
	if !strings.HasSuffix(string(data), "\nthe end\n") {
		t.Errorf("the console does not end with the last write: %q", data[max(0, len(data)-40):])
	}
}

func TestWriterRotatesAnOversizedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	// As an older node's QEMU left it: 2 GiB, ending with a line.
	if err := os.Truncate(path, 0); !os.IsNotExist(err) {
		t.Fatal(err)
	}
	f, _ := os.Create(path)
	f.Truncate(2 << 30)
	f.WriteAt([]byte("the last line\n"), 2<<30)
	f.Close()
	w, err := OpenWriter(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if s := size(t, path); s != 0 {
		t.Errorf("current file has %d bytes after open, want 0", s)
	}
	if s := size(t, path+Rotated); s != 512<<10 {
		t.Errorf("rotated half has %d bytes, want 512 KiB", s)
	}
	data, _ := os.ReadFile(path + Rotated)
	if !strings.HasSuffix(string(data), "the last line\n") {
		t.Error("the rotated half lost the end of the file")
	}
	if _, err := OpenWriter(path, 1024); err == nil {
		t.Error("a cap below the minimum was accepted")
	}
}

func collect(t *testing.T, path string, lim Limits) []string {
	t.Helper()
	var lines []string
	ended, err := Follow(context.Background(), path, lim, func() bool { return false }, func(l string) error {
		lines = append(lines, l)
		return nil
	})
	if err != nil || !ended {
		t.Fatalf("follow: ended %v, %v", ended, err)
	}
	return lines
}

func TestFollowSendsTheEndAcrossTheRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.log")
	os.WriteFile(path+Rotated, []byte("old 1\nold 2\nold 3\n"), 0o600)
	os.WriteFile(path, []byte("new 1\r\nnew 2\nno newline"), 0o600)
	got := collect(t, path, Limits{Past: 1 << 20})
	want := "old 1|old 2|old 3|new 1|new 2|no newline"
	if strings.Join(got, "|") != want {
		t.Errorf("got %q", got)
	}
	// Only the last 29 bytes: the end of the rotated half, then the file.
	got = collect(t, path, Limits{Past: 29})
	if strings.Join(got, "|") != "old 3|new 1|new 2|no newline" {
		t.Errorf("last 29 bytes: %q", got)
	}
	got = collect(t, path, Limits{Past: 1 << 20, MaxLine: 4})
	if strings.Join(got[:3], "|") != "old |1|old " {
		t.Errorf("lines cut at 4 bytes: %q", got)
	}
	if _, err := Follow(context.Background(), filepath.Join(dir, "none"), Limits{}, func() bool { return false }, nil); err != nil {
		t.Errorf("a console not made yet: %v", err)
	}
}

// TestFollowKeepsUpWithRotations follows a console while a writer with a
// small cap rotates it many times: every line arrives, in order.
func TestFollowKeepsUpWithRotations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	w, err := OpenWriter(path, MinMaxSize)
	if err != nil {
		t.Fatal(err)
	}
	var done atomic.Bool
	var got []string
	following := make(chan error, 1)
	go func() {
		_, err := Follow(context.Background(), path, Limits{Poll: time.Millisecond}, func() bool { return !done.Load() }, func(l string) error {
			got = append(got, l)
			return nil
		})
		following <- err
	}()
	const lines = 3000
	for i := range lines {
		fmt.Fprintf(w, "line %05d %s\n", i, strings.Repeat("=", 40))
		if i%50 == 0 {
			time.Sleep(2 * time.Millisecond) // the follower keeps up, as with a real console
		}
	}
	w.Close()
	time.Sleep(20 * time.Millisecond)
	done.Store(true)
	if err := <-following; err != nil {
		t.Fatal(err)
	}
	next := 0
	for _, l := range got {
		var n int
		if _, err := fmt.Sscanf(l, "line %d", &n); err != nil {
			t.Fatalf("odd line %q", l)
		}
		if n < next {
			t.Fatalf("line %d after %d", n, next-1)
		}
		next = n + 1
	}
	if next != lines {
		t.Errorf("last line %d, want %d", next-1, lines-1)
	}
}

// TestFollowOfAHugeConsoleIsBounded reads a 2 GiB console (sparse, no
// newline but at its end) and checks that the answer and the memory
// allocated meanwhile stay within bounds.
func TestFollowOfAHugeConsoleIsBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(2 << 30); err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("\nlast words\n"), 2<<30)
	f.Close()

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var sent int64
	var last string
	ended, err := Follow(context.Background(), path, DefaultLimits, func() bool { return false }, func(l string) error {
		sent += int64(len(l)) + 1
		last = l
		return nil
	})
	runtime.ReadMemStats(&after)
	if err != nil || !ended {
		t.Fatalf("ended %v, %v", ended, err)
	}
	if last != "last words" {
		t.Errorf("last line %q", last)
	}
	if sent > DefaultLimits.Past+int64(DefaultLimits.MaxLine) {
		t.Errorf("sent %d bytes of a 2 GiB console, more than the %d asked", sent, DefaultLimits.Past)
	}
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("sent %d bytes, allocated %d bytes", sent, allocated)
	if allocated > 64<<20 {
		t.Errorf("allocated %d bytes to read the end of a 2 GiB console", allocated)
	}
}
