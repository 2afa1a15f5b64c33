package program

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

// The output of a stopped program is saved, so that its logs still say
// why it stopped after the node restarts: each stopped program's last
// output (the archive's lines and bytes per program: 1000 lines, 1 MiB)
// in <dir>/<item hash>.log, one JSON line per line of output, for the
// last DefaultLogEnded programs stopped. The output of a program still
// running when the node is killed is not saved (it is in memory only
// until the program stops).

// logFileLine is one line of output in a program's log file.
type logFileLine struct {
	Time   time.Time    `json:"t"`
	Stream guest.Stream `json:"s"`
	Text   string       `json:"m"`
}

// SaveTo keeps the output of the programs that stop in dir, made if
// missing, and reads it back for the logs of a program the archive no
// longer holds, as after a node restart.
func (a *LogArchive) SaveTo(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("programs' log directory: %w", err)
	}
	a.dir = dir
	return nil
}

// logFile is where the output of program ref is kept, or "" for a ref
// that is not an item hash (never a path).
func (a *LogArchive) logFile(ref message.ItemHash) string {
	if _, err := message.ParseItemHash(string(ref)); err != nil || strings.ContainsAny(string(ref), `/\.`) {
		return ""
	}
	return filepath.Join(a.dir, string(ref)+".log")
}

// save writes the output of the stopped program b to its file, then
// removes the oldest files past the bound. A failure loses the file, not
// the output in memory.
func (a *LogArchive) save(b *LogBuffer) {
	if a.dir == "" {
		return
	}
	path := a.logFile(b.ref)
	if path == "" {
		return
	}
	a.diskMu.Lock()
	defer a.diskMu.Unlock()
	if err := writeLogFile(path, b.Tail(a.lines)); err != nil {
		_ = os.Remove(path + ".tmp")
		return
	}
	a.pruneLocked()
}

func writeLogFile(path string, lines []guest.LogLine) error {
	f, err := os.OpenFile(path+".tmp", os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	enc := json.NewEncoder(w)
	for _, l := range lines {
		if err := enc.Encode(logFileLine{Time: l.Time, Stream: l.Stream, Text: l.Text}); err != nil {
			f.Close()
			return err
		}
	}
	if err := errors.Join(w.Flush(), f.Close()); err != nil {
		return err
	}
	return os.Rename(path+".tmp", path)
}

// pruneLocked removes the oldest log files past maxEnded.
func (a *LogArchive) pruneLocked() {
	entries, err := os.ReadDir(a.dir)
	if err != nil || len(entries) <= a.maxEnded {
		return
	}
	type file struct {
		name string
		mod  time.Time
	}
	var files []file
	for _, e := range entries {
		if info, err := e.Info(); err == nil && strings.HasSuffix(e.Name(), ".log") {
			files = append(files, file{e.Name(), info.ModTime()})
		}
	}
	slices.SortFunc(files, func(x, y file) int { return x.mod.Compare(y.mod) })
	for _, f := range files[:max(0, len(files)-a.maxEnded)] {
		_ = os.Remove(filepath.Join(a.dir, f.name))
	}
}

// maxLogFile bounds what is read of a log file: its lines with their JSON.
const maxLogFile = 4 * DefaultLogBytes

// load reads the saved output of program ref into an ended buffer of the
// archive, within the archive's bounds; nil when there is none.
func (a *LogArchive) load(ref message.ItemHash) *LogBuffer {
	path := a.logFile(ref)
	if path == "" {
		return nil
	}
	a.diskMu.Lock()
	f, err := os.Open(path)
	a.diskMu.Unlock()
	if err != nil {
		return nil
	}
	defer f.Close()
	b := &LogBuffer{ref: ref, maxLines: a.lines, maxBytes: a.bytes, wake: make(chan struct{})}
	sc := bufio.NewScanner(io.LimitReader(f, maxLogFile))
	sc.Buffer(nil, 2*MaxLogText+256)
	for sc.Scan() {
		var l logFileLine
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		b.Add(guest.LogLine{Time: l.Time, Stream: l.Stream, Text: l.Text})
	}
	if sc.Err() != nil && b.n == 0 {
		return nil
	}
	b.end()
	a.mu.Lock()
	defer a.mu.Unlock()
	if cur := a.bufs[ref]; cur != nil {
		return cur // a VM started meanwhile, or another reader loaded it
	}
	b.archive = a
	a.bufs[ref] = b
	b.counted = int64(b.bytes)
	a.total += b.counted
	a.endLocked(b)
	for a.total > a.totalBytes && a.ended.Front().Value != b {
		a.removeLocked(a.ended.Front().Value.(*LogBuffer))
	}
	return b
}
