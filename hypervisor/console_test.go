package hypervisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func writeConsole(t *testing.T, dir, text string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, ConsoleLog), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
}

func TestFollowConsole(t *testing.T) {
	dir := t.TempDir()
	writeConsole(t, dir, "booting\r\nsystemd up\npart")
	var running atomic.Bool
	running.Store(true)
	var lines []string
	done := make(chan struct{})
	var ended bool
	var err error
	go func() {
		defer close(done)
		ended, err = FollowConsole(context.Background(), dir, running.Load, func(l string) error {
			lines = append(lines, l)
			return nil
		})
	}()
	time.Sleep(3 * consolePoll)
	writeConsole(t, dir, "ial line\nlogin: ")
	time.Sleep(3 * consolePoll)
	// Written just before the VM stopped, seen after: still sent.
	writeConsole(t, dir, "\npower off\nlast")
	running.Store(false)
	<-done
	if err != nil || !ended {
		t.Errorf("ended %v, err %v", ended, err)
	}
	want := []string{"booting", "systemd up", "partial line", "login: ", "power off", "last"}
	if diff := cmp.Diff(want, lines); diff != "" {
		t.Errorf("lines (-want +got):\n%s", diff)
	}
}

func TestFollowConsoleNoFile(t *testing.T) {
	for _, running := range []bool{true, false} {
		ended, err := FollowConsole(context.Background(), t.TempDir(), func() bool { return running }, func(string) error {
			t.Error("a line from no file")
			return nil
		})
		if err != nil || ended == running {
			t.Errorf("running %v: ended %v, err %v", running, ended, err)
		}
	}
}

func TestFollowConsoleStops(t *testing.T) {
	dir := t.TempDir()
	writeConsole(t, dir, "one\ntwo\n")
	ctx, cancel := context.WithTimeout(context.Background(), 2*consolePoll)
	defer cancel()
	ended, err := FollowConsole(ctx, dir, func() bool { return true }, func(string) error { return nil })
	if ended || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("ctx ended: ended %v, err %v", ended, err)
	}
	stop := errors.New("client gone")
	ended, err = FollowConsole(context.Background(), dir, func() bool { return true }, func(string) error { return stop })
	if ended || !errors.Is(err, stop) {
		t.Errorf("fn failed: ended %v, err %v", ended, err)
	}
}

// A guest that never writes a newline gets its output cut into bounded
// lines, not held whole.
func TestFollowConsoleBoundsLines(t *testing.T) {
	dir := t.TempDir()
	writeConsole(t, dir, strings.Repeat("x", 5*MaxConsoleLine+10))
	var total, longest int
	ended, err := FollowConsole(context.Background(), dir, func() bool { return false }, func(l string) error {
		total += len(l)
		longest = max(longest, len(l))
		return nil
	})
	if err != nil || !ended || total != 5*MaxConsoleLine+10 || longest > MaxConsoleLine {
		t.Errorf("ended %v, err %v, %d bytes sent, longest line %d", ended, err, total, longest)
	}
}

func TestFollowConsoleUnreadable(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, ConsoleLog), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := FollowConsole(context.Background(), dir, func() bool { return false }, func(string) error { return nil }); err == nil {
		t.Error("a directory was followed as a console")
	}
}
