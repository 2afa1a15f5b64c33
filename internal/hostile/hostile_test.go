package hostile

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// The table is docs/hostile-inputs.md. TestHostileInputs writes it when
// UPDATE_HOSTILE_TABLE is set, and otherwise fails when the committed file
// differs from what the code answers today.
const (
	tablePath = "../../docs/hostile-inputs.md"
	updateEnv = "UPDATE_HOSTILE_TABLE"
)

// outcome is how a component answered a hostile input.
type outcome int

const (
	// refused: an HTTP status of 400 or more with a message, a failure
	// frame or close, or an error.
	refused outcome = iota
	// harmless: accepted in a form the row checks cannot hurt (a volume
	// name escaped into one file name, an archive opened as raw bytes, a
	// guest's oversized text cut).
	harmless
)

func (o outcome) String() string {
	if o == harmless {
		return "kept harmless"
	}
	return "refused"
}

// answer is what a row's component answered.
type answer struct {
	kind outcome
	text string
}

// row is one hostile input.
type row struct {
	category string
	input    string // what was sent, for the table (Markdown)
	target   string // the real component it was fed to
	// needs names a tool the row needs; the row skips without it.
	needs string
	// maxAllocMiB bounds what the row may allocate (the input included;
	// only while feeding it when the row calls feed); 0 means
	// defaultAllocMiB.
	maxAllocMiB uint64
	run         func(t *testing.T) answer
}

const defaultAllocMiB = 64

// categories, in the table's order, with what they cover.
var categories = []struct{ name, about string }{
	{"Messages", "Aleph messages as the node receives them (from the core node API, `message add`, the CLI)."},
	{"Refs", "Item hashes in URLs and host names, anyone on the network can send."},
	{"Headers", "Credentials and headers of HTTP requests to the API (`api.Server` with the real `auth.Allocation` and `auth.Owner` behind it, and fakes of the pool and the instance manager)."},
	{"Bodies", "Bodies of authenticated and anonymous calls."},
	{"HTTP server", "What reaches the node's `http.Server`, built by `api.Server.HTTPServer` with the node's limits."},
	{"Websocket frames", "The logs websockets: the owner's `stream_logs` (credentials in the first frame) and the operator's `logs`."},
	{"Guest frames", "What a hostile guest writes on its control channel, to the host's `guest.Client` (over `net.Pipe`, with a fake guest)."},
	{"Images", "Instance base images, as `storage.InspectParent` meets them before any use, and the layers naming their parent by item hash, as `storage.InspectChain` meets them with the store's answers (made with `qemu-img` or by hand)."},
	{"Archives", "Code, data and runtime files, and IPFS CAR streams from a gateway (`store.Store.Fetch` against a fake gateway)."},
	{"Downloads", "Answers of the core node API and of the gateway to `store.Store.Fetch`."},
	{"Aggregates", "Owners' aggregates read from the core node API (`aggregate.Client`)."},
	{"Volume names", "Names of volumes in messages, as `storage.VolumeFileName` turns them into file names."},
	{"Settings", "Operator's mistakes in the environment or the config file (`config.Load`)."},
	{"Guest API", "Calls a program makes to the node's guest API from inside its VM (`guestapi.Service`, with its SQLite cache, signing key and a fake core node)."},
}

func allRows() []row {
	var rows []row
	for _, f := range []func() []row{messageRows, refRows, headerRows, bodyRows, serverRows, websocketRows, guestRows,
		imageRows, layerRows, compressedRows, archiveRows, downloadRows, aggregateRows, volumeNameRows, settingRows, guestAPIRows} {
		rows = append(rows, f()...)
	}
	return rows
}

func TestHostileInputs(t *testing.T) {
	rows := allRows()
	if len(rows) < 30 {
		t.Fatalf("%d rows, the table needs at least 30", len(rows))
	}
	known := map[string]bool{}
	for _, c := range categories {
		known[c.name] = true
	}
	results := make([]result, len(rows))
	for i, r := range rows {
		if !known[r.category] {
			t.Fatalf("row %q: unknown category %q", r.input, r.category)
		}
		results[i] = runRow(t, i+1, r)
	}
	table := render(rows, results)
	skipped := 0
	for _, res := range results {
		switch {
		case !res.ran:
			t.Logf("some rows did not run (-run): the table is not checked")
			return
		case res.skipped != "":
			skipped++
		}
	}
	if os.Getenv(updateEnv) != "" {
		if skipped > 0 {
			t.Fatalf("%d rows skipped: the table can only be written where every row runs", skipped)
		}
		if err := os.WriteFile(tablePath, []byte(table), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s: %d rows", tablePath, len(rows))
		return
	}
	committed, err := os.ReadFile(tablePath)
	if err != nil {
		t.Fatalf("%v (write it with %s=1 go test ./internal/hostile)", err, updateEnv)
	}
	if diff := compareTables(string(committed), table); diff != "" {
		t.Errorf("%s differs from what the code answers (rewrite it with %s=1 go test ./internal/hostile):\n%s", tablePath, updateEnv, diff)
	}
}

// result is what running a row gave.
type result struct {
	answer  answer
	ran     bool
	skipped string // why the row did not run
}

// runRow feeds one input in a subtest and checks what is left after it:
// no panic, the goroutines back to their number before it, and at most
// the row's allocations.
func runRow(t *testing.T, n int, r row) result {
	var res result
	goroutines := runtime.NumGoroutine()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	t.Run(fmt.Sprintf("%02d", n), func(t *testing.T) {
		res.ran = true
		t.Logf("%s: %s -> %s", r.category, r.input, r.target)
		if r.needs != "" {
			if _, err := exec.LookPath(r.needs); err != nil {
				res.skipped = r.needs + " is not installed"
				t.Skip(res.skipped)
			}
		}
		defer func() {
			if p := recover(); p != nil {
				t.Fatalf("panic: %v", p)
			}
		}()
		res.answer = r.run(t)
		if strings.TrimSpace(res.answer.text) == "" {
			t.Errorf("no answer to tell what happened")
		}
		t.Logf("%s: %s", res.answer.kind, res.answer.text)
	})
	runtime.ReadMemStats(&after)
	limit := r.maxAllocMiB
	if limit == 0 {
		limit = defaultAllocMiB
	}
	got := after.TotalAlloc - before.TotalAlloc
	if meter.fed {
		got = meter.alloc
	}
	meter = allocMeter{}
	t.Logf("row %d allocated %.1f MiB", n, float64(got)/(1<<20))
	if got>>20 > limit && !raceEnabled {
		t.Errorf("row %d (%s): allocated %d MiB, more than its bound of %d MiB", n, r.input, got>>20, limit)
	}
	if left := waitGoroutines(goroutines, 5*time.Second); left > 0 {
		buf := make([]byte, 1<<20)
		t.Errorf("row %d (%s): %d goroutines more than before it, still running after 5 s:\n%s", n, r.input, left, buf[:runtime.Stack(buf, true)])
	}
	return res
}

// allocMeter holds what the row being run allocated in feed, when it
// calls it: a row whose rig costs more than its input (a database, a
// store) measures only the feeding.
type allocMeter struct {
	fed   bool
	alloc uint64
}

var meter allocMeter

// feed runs fn, the feeding of a row's input to its component, and
// counts what it allocates as the row's allocation.
func feed(fn func()) {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	meter.fed = true
	meter.alloc += after.TotalAlloc - before.TotalAlloc
}

// waitGoroutines waits until at most n goroutines run and returns how many
// more than n are left at the deadline.
func waitGoroutines(n int, d time.Duration) int {
	deadline := time.Now().Add(d)
	for {
		extra := runtime.NumGoroutine() - n
		if extra <= 0 || time.Now().After(deadline) {
			return max(extra, 0)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Answers.

// refusedErr is the answer of a component that returned err: it must be
// an error.
func refusedErr(t *testing.T, err error) answer {
	t.Helper()
	if err == nil {
		t.Errorf("accepted: want a refusal")
		return answer{kind: refused, text: "ACCEPTED"}
	}
	return answer{kind: refused, text: err.Error()}
}

// checkEmptyDir fails the test when dir holds anything: what a refused
// input made must be removed.
func checkEmptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("left behind: %s", filepath.Join(dir, e.Name()))
	}
}

func harmlessAnswer(format string, args ...any) answer {
	return answer{kind: harmless, text: fmt.Sprintf(format, args...)}
}

// Rendering.

var (
	hashRE = regexp.MustCompile(`\b(?:[0-9a-f]{64}|Qm[1-9A-HJ-NP-Za-km-z]{44}|baf[a-z2-7]{56})\b`)
	portRE = regexp.MustCompile(`127\.0\.0\.1:\d+`)
	tmpRE  = regexp.MustCompile(regexp.QuoteMeta(filepath.Clean(os.TempDir())) + `/Test[^/\s"']*/\d+`)
)

// clean makes an answer the same from run to run and readable: temporary
// directories and loopback ports replaced, hashes and CIDs shortened to
// their first characters, one line, bounded.
func clean(s string) string {
	s = tmpRE.ReplaceAllString(s, "$$TMP")
	s = hashRE.ReplaceAllStringFunc(s, func(h string) string { return h[:8] + "…" })
	s = portRE.ReplaceAllString(s, "127.0.0.1:PORT")
	s = strings.Join(strings.Fields(s), " ")
	const max = 300
	if len(s) > max {
		s = s[:max]
		for !utf8.ValidString(s) {
			s = s[:len(s)-1]
		}
		s += "…"
	}
	return s
}

// cell escapes text for a Markdown table cell; the answers are shown as
// code, so that what a component said is read as it said it.
func cell(s string) string {
	return strings.ReplaceAll(s, "|", `\|`)
}

func code(s string) string {
	if s == "" {
		return ""
	}
	s = strings.ReplaceAll(s, "`", "'")
	return "`" + cell(s) + "`"
}

const skippedLine = "SKIPPED"

func render(rows []row, results []result) string {
	var b bytes.Buffer
	b.WriteString(`# Hostile inputs, and what the node answers

Generated by ` + "`TestHostileInputs`" + ` (package ` + "`internal/hostile`" + `): do not edit.
Each row was fed to the real component named, and the test checks that
nothing panicked, that the goroutines went back to their number before the
row, that the row allocated at most its bound (64 MiB unless it says
otherwise; the input included), that files a row writes are removed, and
that the answer is a clear refusal (an HTTP status of 400 or more with a
message, a failure frame, or a named error) or, where it says "kept
harmless", a form the row checks cannot do harm. The test fails when this
file differs from what the code answers; after a change, rewrite it with
` + "`" + updateEnv + `=1 go test ./internal/hostile` + "`" + `. The threat model
is [security.md](security.md).

`)
	n := 0
	for _, c := range categories {
		first := true
		for i, r := range rows {
			if r.category != c.name {
				continue
			}
			if first {
				fmt.Fprintf(&b, "## %s\n\n%s\n\n| # | Input | Fed to | Outcome | Answer |\n|---|---|---|---|---|\n", c.name, c.about)
				first = false
			}
			n++
			res := results[i]
			if res.skipped != "" {
				fmt.Fprintf(&b, "%s %d\n", skippedLine, n)
				continue
			}
			input := r.input
			if r.maxAllocMiB != 0 {
				input += fmt.Sprintf(" (bound: %d MiB)", r.maxAllocMiB)
			}
			fmt.Fprintf(&b, "| %d | %s | %s | %s | %s |\n", n, cell(input), cell(r.target), res.answer.kind, code(clean(res.answer.text)))
		}
		if !first {
			b.WriteString("\n")
		}
	}
	return b.String()
}

// compareTables compares the committed table with the generated one, line
// by line; the lines of skipped rows match any committed line. It returns
// the lines that differ.
func compareTables(committed, generated string) string {
	c, g := strings.Split(committed, "\n"), strings.Split(generated, "\n")
	var diff strings.Builder
	for i := 0; i < max(len(c), len(g)); i++ {
		var cl, gl string
		if i < len(c) {
			cl = c[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if cl == gl || strings.HasPrefix(gl, skippedLine+" ") && strings.HasPrefix(cl, "| ") {
			continue
		}
		fmt.Fprintf(&diff, "line %d:\n  committed: %s\n  generated: %s\n", i+1, cl, gl)
	}
	return diff.String()
}
