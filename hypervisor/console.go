package hypervisor

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// MaxConsoleLine bounds one line read from a console: the guest writes
// the file, and a guest that never writes a newline gets its output cut
// into lines of this size rather than held whole in the node's memory.
const MaxConsoleLine = 64 << 10

// consolePoll is how often FollowConsole looks for new output.
const consolePoll = 200 * time.Millisecond

// FollowConsole calls fn with each line of the console of the VM whose
// runtime directory is dir (ConsoleLog), then with each line appended
// while running() holds. It returns ended true when the VM stopped (all
// its output sent), false when ctx ended or fn failed.
func FollowConsole(ctx context.Context, dir string, running func() bool, fn func(string) error) (ended bool, err error) {
	f, err := os.Open(filepath.Join(dir, ConsoleLog))
	if errors.Is(err, os.ErrNotExist) {
		return !running(), nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, MaxConsoleLine)
	var partial strings.Builder
	stopped := false
	for {
		chunk, err := r.ReadSlice('\n')
		partial.Write(chunk)
		switch {
		case err == nil || errors.Is(err, bufio.ErrBufferFull) || partial.Len() >= MaxConsoleLine:
			if err := fn(strings.TrimRight(partial.String(), "\r\n")); err != nil {
				return false, err
			}
			partial.Reset()
			continue
		case !errors.Is(err, io.EOF):
			return false, err
		case stopped:
			if partial.Len() > 0 {
				return true, fn(strings.TrimRight(partial.String(), "\r\n"))
			}
			return true, nil
		case !running():
			stopped = true // one more pass: what it wrote before it stopped
			continue
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(consolePoll):
		}
	}
}
