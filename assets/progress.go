package assets

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// progress writes what a build is doing, one line at a time, to a
// terminal or a log.
type progress struct {
	mu sync.Mutex
	w  io.Writer
}

func newProgress(w io.Writer) *progress {
	if w == nil {
		w = io.Discard
	}
	return &progress{w: w}
}

func (p *progress) printf(step, format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "%-9s %s\n", step+":", fmt.Sprintf(format, args...))
}

// run runs a command, copying its output lines to the progress with the
// step's name, and says how long it took. A command that stays silent
// for a while gets a line saying it is still running.
func (p *progress) run(ctx context.Context, step string, name string, args ...string) error {
	return p.runCmd(step, exec.CommandContext(ctx, name, args...))
}

// runCmd is run for a command that needs more than its arguments (an
// environment, a standard input).
func (p *progress) runCmd(step string, cmd *exec.Cmd) error {
	name, args := filepath.Base(cmd.Path), cmd.Args[1:]
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	var tail []string
	done := make(chan struct{})
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	go func() {
		defer close(done)
		start := time.Now()
		tick := time.NewTicker(15 * time.Second)
		defer tick.Stop()
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					return
				}
				p.printf(step, "  %s", l)
				tail = append(tail, l)
				if len(tail) > 20 {
					tail = tail[1:]
				}
			case <-tick.C:
				p.printf(step, "  ... %s still running (%s)", name, time.Since(start).Round(time.Second))
			}
		}
	}()
	start := time.Now()
	err := cmd.Run()
	pw.Close()
	<-done
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, strings.Join(tail, "\n"))
	}
	p.printf(step, "%s done in %s", name, time.Since(start).Round(100*time.Millisecond))
	return nil
}

// output runs a command and returns its standard output.
func output(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// command is exec.CommandContext, named so for the files that also have a
// variable called exec.
func command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, name, args...)
}
