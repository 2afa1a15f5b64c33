package hypervisor

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func TestEscalate(t *testing.T) {
	// Each step records itself; the one named by stopsAt ends the VM.
	run := func(stopsAt string) ([]string, error) {
		done := make(chan struct{})
		var ran []string
		step := func(name string, fail bool) StopStep {
			return StopStep{Name: name, Timeout: 50 * time.Millisecond, Act: func(context.Context) error {
				ran = append(ran, name)
				if fail {
					return errors.New("refused")
				}
				if name == stopsAt {
					close(done)
				}
				return nil
			}}
		}
		steps := []StopStep{step("halt", true), {Name: "skipped"}, step("gentle", false), step("kill", false)}
		return ran, Escalate(context.Background(), "vm", done, steps, quiet)
	}
	for stopsAt, want := range map[string][]string{
		"gentle": {"halt", "gentle"},
		"kill":   {"halt", "gentle", "kill"},
	} {
		ran, err := run(stopsAt)
		if err != nil || !slices.Equal(ran, want) {
			t.Errorf("stopped at %s: ran %v, %v", stopsAt, ran, err)
		}
	}
	if ran, err := run("never"); err == nil || !strings.Contains(err.Error(), "still running") || len(ran) != 3 {
		t.Errorf("a VM that never stops: ran %v, %v", ran, err)
	}
}

func TestEscalateDoneAlready(t *testing.T) {
	done := make(chan struct{})
	close(done)
	called := false
	err := Escalate(context.Background(), "vm", done, []StopStep{{Name: "x", Timeout: time.Second, Act: func(context.Context) error {
		called = true
		return nil
	}}}, quiet)
	if err != nil || called {
		t.Errorf("%v, called %v", err, called)
	}
}

func TestWaitFor(t *testing.T) {
	tries := 0
	err := WaitFor(context.Background(), "socket", nil, func(context.Context) error {
		if tries++; tries < 3 {
			return errors.New("connection refused")
		}
		return nil
	})
	if err != nil || tries != 3 {
		t.Errorf("%v after %d tries", err, tries)
	}

	exited := make(chan struct{})
	close(exited)
	if err := WaitFor(context.Background(), "socket", exited, func(context.Context) error { return errors.New("no") }); !errors.Is(err, ErrExited) {
		t.Errorf("process exited: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	err = WaitFor(ctx, "socket", nil, func(context.Context) error { return errors.New("refused") })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "refused") {
		t.Errorf("deadline: %v", err)
	}
}
