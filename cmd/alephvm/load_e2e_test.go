package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/pool"
)

// loadSizes are the sizes of one run of the load suite.
type loadSizes struct {
	programs, clients int
	duration          time.Duration
	// The slow clients, run beside the load.
	slowloris, slowReaders, stalledReaders int
	slowSize                               int64 // bytes each slow reader reads
	// extra are the programs deployed past what the node's memory admits.
	extra  int
	sample time.Duration // how often the node's RSS and files are read
}

var (
	shortLoad = loadSizes{programs: 2, clients: 50, duration: 30 * time.Second,
		slowloris: 20, slowReaders: 4, stalledReaders: 4, slowSize: 3 << 20, extra: 2, sample: 5 * time.Second}
	fullLoad = loadSizes{programs: 10, clients: 200, duration: 5 * time.Minute,
		slowloris: 200, slowReaders: 20, stalledReaders: 20, slowSize: 16 << 20, extra: 3, sample: 30 * time.Second}
)

// The node's settings in the load suite: short timeouts, so that slow
// clients are cut within the run.
const (
	loadHeaderTimeout = 5 * time.Second
	loadWriteTimeout  = 5 * time.Second
	loadProgramMiB    = 128
	// slowRate is how fast a slow reader reads: the node writes each
	// 128 KiB it waits for within a second, well inside its write
	// timeout, but a third of a 4 MiB send queue (what a blocked write
	// waits for without TCP_NOTSENT_LOWAT) takes 10 s.
	slowRate = 128 << 10
	// stalledSize is the answer a stalled reader asks for and stops
	// reading: far more than the sockets' buffers hold.
	stalledSize = 256 << 20
)

// loadSizesFromEnv picks the run's sizes: the short one unless
// ALEPHVM_LOAD_FULL=1; ALEPHVM_LOAD_PROGRAMS, _CLIENTS and _DURATION
// override either.
func loadSizesFromEnv(t *testing.T) loadSizes {
	s := shortLoad
	if os.Getenv("ALEPHVM_LOAD_FULL") == "1" {
		s = fullLoad
	}
	for name, dst := range map[string]*int{"ALEPHVM_LOAD_PROGRAMS": &s.programs, "ALEPHVM_LOAD_CLIENTS": &s.clients} {
		if v := os.Getenv(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				t.Fatalf("%s=%q: want a positive number", name, v)
			}
			*dst = n
		}
	}
	if v := os.Getenv("ALEPHVM_LOAD_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("ALEPHVM_LOAD_DURATION=%q: want a duration such as 2m", v)
		}
		s.duration = d
	}
	return s
}

// TestLoad runs the node with programs of testdata/loadprog and drives
// clients against them: small requests, streamed answers, uploads and
// websockets, half of the clients on kept-alive connections. Beside them
// run slow clients (slowloris, slow readers, stalled readers); after them,
// more programs than the node's memory admits. It checks that every
// request is answered right, that slow clients are cut or not as they
// deserve, that the extra programs get 503 with Retry-After while no
// running VM is lost and the host kills nothing for memory; and it logs
// the figures. The short run is the default; ALEPHVM_LOAD_FULL=1 (or
// scripts/load.sh) runs the full one.
func TestLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("boots program VMs under emulation and loads them")
	}
	assetsDir := testassets.ProgramAssets(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "nft", "mkfs.ext4", "go")
	sizes := loadSizesFromEnv(t)
	memTotal, err := pool.MemTotalMiB()
	if err != nil {
		t.Fatal(err)
	}
	oomBefore := oomKills(t)

	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	// The node's memory admits the programs, and no more.
	capacity := sizes.programs*loadProgramMiB + loadProgramMiB/2
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_REUSE_TIMEOUT=3600", "ALEPH_VM_INIT_TIMEOUT=240",
		"ALEPH_VM_LOG_LEVEL=warn", "ALEPH_VM_HOST_MEMORY_RESERVED_MIB="+strconv.Itoa(memTotal-capacity),
		"ALEPH_VM_VCPU_OVERCOMMIT_FACTOR="+strconv.Itoa(sizes.programs+sizes.extra),
		"ALEPH_VM_HTTP_HEADER_TIMEOUT="+loadHeaderTimeout.String(), "ALEPH_VM_HTTP_WRITE_TIMEOUT="+loadWriteTimeout.String())
	codeDir := filepath.Join(dir, "loadprog")
	build := exec.Command("go", "build", "-o", filepath.Join(codeDir, "loadprog"), "./testdata/loadprog")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the load program: %v\n%s", err, out)
	}
	node := startNode(t, env, port)
	create := func(i int) string {
		t.Helper()
		code, out, errOut := runCLI(t, env, "program", "create", codeDir, "--entrypoint", "loadprog", "--interface", "binary",
			"--memory", strconv.Itoa(loadProgramMiB), "--env", "LOADPROG="+strconv.Itoa(i))
		if code != 0 {
			t.Fatalf("program create: %s %s", out, errOut)
		}
		return strings.Fields(out)[0]
	}
	refs := make([]string, sizes.programs)
	for i := range refs {
		refs[i] = create(i)
	}

	// Every program boots on its first request, all at once.
	start := time.Now()
	var wg sync.WaitGroup
	for _, ref := range refs {
		wg.Go(func() {
			if status, body := httpGet(t, programURL(port, ref, "/small")); status != 200 {
				t.Errorf("first request to %s: %d %s", ref, status, body)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.Fatalf("programs did not boot:\n%s", node.logs.String())
	}
	booted := time.Since(start)
	pids := map[string]int{}
	for _, ref := range refs {
		pids[ref] = qemuPID(ref)
	}

	pid := node.cmd.Process.Pid
	samples := &nodeSamples{}
	samples.take(t, pid, 0)
	baseline := samples.list[0]
	ctx, cancel := context.WithTimeout(context.Background(), sizes.duration)
	defer cancel()
	stopSampling := samples.every(t, pid, sizes.sample)

	var slow slowResults
	var slowDone sync.WaitGroup
	slowDone.Go(func() { slow.slowloris = runSlowloris(port, refs[0], sizes.slowloris) })
	slowDone.Go(func() { slow.slowReaders = runSlowReaders(port, refs, sizes.slowReaders, sizes.slowSize) })
	slowDone.Go(func() { slow.stalled = runStalledReaders(port, refs, sizes.stalledReaders) })

	qemus := slices.Collect(maps.Values(pids))
	cpuBefore := loadCPU(pid, qemus)
	stats := newLoadStats()
	loadStart := time.Now()
	var clients sync.WaitGroup
	for i := range sizes.clients {
		clients.Go(func() { runLoadClient(ctx, port, refs, i%2 == 0, stats) })
	}
	clients.Wait()
	elapsed := time.Since(loadStart)
	cpu := loadCPU(pid, qemus).minus(cpuBefore)
	slowDone.Wait()
	stopSampling()
	// The clients' connections are closed; the node's files should come
	// back to what they were.
	time.Sleep(2 * time.Second)
	samples.take(t, pid, time.Since(loadStart))
	after := samples.list[len(samples.list)-1]

	over := runOverload(t, env, port, create, sizes.programs, sizes.extra)
	var lost []string
	for _, ref := range refs {
		if p := qemuPID(ref); p == 0 || p != pids[ref] {
			lost = append(lost, fmt.Sprintf("%s (QEMU %d, now %d)", ref[:12], pids[ref], p))
		}
		if status, _ := httpGet(t, programURL(port, ref, "/small")); status != 200 {
			lost = append(lost, fmt.Sprintf("%s answers %d", ref[:12], status))
		}
	}
	oomAfter := oomKills(t)

	loadavg, _ := os.ReadFile("/proc/loadavg")
	t.Logf("load suite: %d programs (booted together in %.1f s), %d clients (%d kept alive), %s; %d CPUs, load average %s",
		sizes.programs, booted.Seconds(), sizes.clients, (sizes.clients+1)/2, sizes.duration, runtime.NumCPU(), strings.Join(strings.Fields(string(loadavg))[:3], " "))
	t.Log("\n" + stats.table(elapsed))
	t.Logf("CPU used during the load (%.0f CPU-seconds available): node %.0f s, the %d QEMUs %.0f s, this test's clients %.0f s",
		elapsed.Seconds()*float64(runtime.NumCPU()), cpu.node, len(qemus), cpu.qemus, cpu.clients)
	t.Log("\n" + samples.table())
	t.Log("\n" + slow.table(sizes))
	t.Logf("overload: %d programs past the node's memory: %d answered 503 with Retry-After; running VMs lost: %d; host OOM kills %d -> %d",
		sizes.extra, over.refused, len(lost), oomBefore, oomAfter)

	// The invariants.
	if errs := stats.errorCount(); errs > 0 {
		t.Errorf("%d requests failed under load: %s", errs, stats.errorSummary())
	}
	if stats.total() == 0 {
		t.Error("no request was answered")
	}
	if ws := len(stats.latencies["websocket"]); stats.slowCloses*100 > ws {
		t.Errorf("%d of %d websocket sessions did not close within 5 s: more than 1%%", stats.slowCloses, ws)
	}
	if after.fds > baseline.fds+64*sizes.programs+64 {
		t.Errorf("the node holds %d files after the load, %d before: a leak", after.fds, baseline.fds)
	}
	if after.rssKiB > 2*baseline.rssKiB+256<<10 {
		t.Errorf("the node's RSS is %d MiB after the load, %d MiB before", after.rssKiB>>10, baseline.rssKiB>>10)
	}
	slow.check(t, sizes)
	for _, e := range over.errs {
		t.Error(e)
	}
	if len(lost) > 0 {
		t.Errorf("running VMs lost: %v", lost)
	}
	if oomAfter != oomBefore {
		t.Errorf("the host killed %d processes for memory during the run", oomAfter-oomBefore)
	}
	if t.Failed() {
		logs := node.logs.String()
		t.Logf("node logs (last 8 KiB):\n%s", logs[max(0, len(logs)-8<<10):])
	}
	node.cmd.Process.Signal(syscall.SIGTERM)
	node.cmd.Wait()
}

// cpuTimes are CPU seconds used by the node, its QEMUs and this test.
type cpuTimes struct{ node, qemus, clients float64 }

func (a cpuTimes) minus(b cpuTimes) cpuTimes {
	return cpuTimes{a.node - b.node, a.qemus - b.qemus, a.clients - b.clients}
}

func loadCPU(node int, qemus []int) cpuTimes {
	c := cpuTimes{node: cpuSeconds(node), clients: cpuSeconds(os.Getpid())}
	for _, p := range qemus {
		c.qemus += cpuSeconds(p)
	}
	return c
}

// cpuSeconds is the user and system time of process pid so far.
func cpuSeconds(pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command's closing parenthesis start at the
	// third, state; utime and stime are the 14th and 15th, in clock ticks
	// (100 a second on Linux).
	i := bytes.LastIndexByte(data, ')')
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0
	}
	user, _ := strconv.ParseFloat(f[11], 64)
	sys, _ := strconv.ParseFloat(f[12], 64)
	return (user + sys) / 100
}

// oomKills is the host's count of processes killed for memory.
func oomKills(t *testing.T) int {
	t.Helper()
	data, err := os.ReadFile("/proc/vmstat")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	t.Fatal("no oom_kill in /proc/vmstat")
	return 0
}

// The load's kinds of requests, and how often each is sent (per 100).
var loadKinds = []struct {
	name   string
	weight int
}{{"small", 70}, {"stream", 15}, {"upload", 10}, {"websocket", 5}}

const (
	streamChunks, streamChunk = 16, 4 << 10
	uploadSize                = 256 << 10
	wsMessages, wsMessage     = 8, 1 << 10
)

// loadStats gathers the load's answers.
type loadStats struct {
	mu         sync.Mutex
	latencies  map[string][]time.Duration
	errors     map[string]int // by kind and status (or failure)
	slowCloses int            // websocket sessions of errSlowClose
}

func (s *loadStats) slowClose() {
	s.mu.Lock()
	s.slowCloses++
	s.mu.Unlock()
}

func newLoadStats() *loadStats {
	return &loadStats{latencies: map[string][]time.Duration{}, errors: map[string]int{}}
}

func (s *loadStats) ok(kind string, d time.Duration) {
	s.mu.Lock()
	s.latencies[kind] = append(s.latencies[kind], d)
	s.mu.Unlock()
}

func (s *loadStats) fail(kind, why string) {
	s.mu.Lock()
	s.errors[kind+" "+why]++
	s.mu.Unlock()
}

func (s *loadStats) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, l := range s.latencies {
		n += len(l)
	}
	return n
}

func (s *loadStats) errorCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.errors {
		n += c
	}
	return n
}

func (s *loadStats) errorSummary() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errors) == 0 {
		return "none"
	}
	var parts []string
	for k, c := range s.errors {
		parts = append(parts, fmt.Sprintf("%s: %d", k, c))
	}
	sort.Strings(parts)
	return strings.Join(parts, "; ")
}

// table is the load's figures by kind: answers, rate, latencies, errors.
func (s *loadStats) table(elapsed time.Duration) string {
	s.mu.Lock()
	var b strings.Builder
	fmt.Fprintf(&b, "%-10s %8s %8s %8s %8s %8s %8s %7s\n", "kind", "answers", "req/s", "p50", "p99", "p99.9", "max", "errors")
	var all []time.Duration
	row := func(name string, l []time.Duration, errs int) {
		slices.Sort(l)
		fmt.Fprintf(&b, "%-10s %8d %8.1f %8s %8s %8s %8s %7d\n", name, len(l), float64(len(l))/elapsed.Seconds(),
			ms(quantile(l, 0.5)), ms(quantile(l, 0.99)), ms(quantile(l, 0.999)), ms(quantile(l, 1)), errs)
	}
	errsOf := func(kind string) int {
		n := 0
		for k, c := range s.errors {
			if strings.HasPrefix(k, kind+" ") {
				n += c
			}
		}
		return n
	}
	totalErrs := 0
	for _, k := range loadKinds {
		l := slices.Clone(s.latencies[k.name])
		all = append(all, l...)
		e := errsOf(k.name)
		totalErrs += e
		row(k.name, l, e)
	}
	row("all", all, totalErrs)
	slowCloses := s.slowCloses
	s.mu.Unlock()
	fmt.Fprintf(&b, "latency: small and upload to the whole answer, stream to its last chunk, websocket a session (upgrade, %d echoes, close)\n", wsMessages)
	fmt.Fprintf(&b, "websocket sessions whose close handshake took over 5 s (counted as answered): %d\n", slowCloses)
	fmt.Fprintf(&b, "errors by status: %s", s.errorSummary())
	return b.String()
}

// quantile is the q-quantile of sorted l.
func quantile(l []time.Duration, q float64) time.Duration {
	if len(l) == 0 {
		return 0
	}
	return l[min(len(l)-1, int(q*float64(len(l))))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond)) }

// runLoadClient sends requests until ctx ends, one at a time, each to a
// program and of a kind picked at random; keepAlive reuses its connection.
func runLoadClient(ctx context.Context, port int, refs []string, keepAlive bool, stats *loadStats) {
	transport := &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 1}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: time.Minute}
	upload := make([]byte, uploadSize)
	rand.Read(upload)
	uploadSum := sha256.Sum256(upload)
	wantUpload := fmt.Sprintf("%d %s\n", uploadSize, hex.EncodeToString(uploadSum[:]))
	for n := 0; ctx.Err() == nil; n++ {
		ref := refs[mathrand.IntN(len(refs))]
		pick, kind := mathrand.IntN(100), ""
		for _, k := range loadKinds {
			if pick < k.weight {
				kind = k.name
				break
			}
			pick -= k.weight
		}
		start := time.Now()
		var err error
		switch kind {
		case "small":
			q := strconv.Itoa(n)
			err = expectBody(client, "GET", programURL(port, ref, "/small?"+q), nil, func(b []byte) bool { return string(b) == "small "+q+"\n" })
		case "stream":
			err = expectBody(client, "GET", programURL(port, ref, fmt.Sprintf("/stream?n=%d&size=%d", streamChunks, streamChunk)), nil,
				func(b []byte) bool { return len(b) == streamChunks*streamChunk && patterned(b, 0) })
		case "upload":
			err = expectBody(client, "POST", programURL(port, ref, "/upload"), upload, func(b []byte) bool { return string(b) == wantUpload })
		case "websocket":
			err = websocketSession(ctx, client, port, ref)
		}
		if ctx.Err() != nil && err != nil {
			return // cut by the end of the run
		}
		if errors.Is(err, errSlowClose) {
			stats.slowClose()
			err = nil
		}
		if err != nil {
			stats.fail(kind, err.Error())
			continue
		}
		stats.ok(kind, time.Since(start))
	}
}

// statusError is an answer of an unexpected status.
type statusError int

func (e statusError) Error() string { return strconv.Itoa(int(e)) }

// expectBody sends a request and checks its answer's status (200) and
// body; errors are short, to be counted.
func expectBody(client *http.Client, method, url string, body []byte, good func([]byte) bool) error {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, _ := http.NewRequest(method, url, r)
	resp, err := client.Do(req)
	if err != nil {
		return errors.New(failure(err))
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	switch {
	case resp.StatusCode != 200:
		return statusError(resp.StatusCode)
	case err != nil:
		return errors.New("body cut: " + failure(err))
	case !good(got):
		return errors.New("wrong body")
	}
	return nil
}

// failure names a transport error by its kind, for counting.
func failure(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "connection closed"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	return err.Error()
}

// patterned reports whether b holds loadprog's pattern from offset off.
func patterned(b []byte, off int64) bool {
	for i, c := range b {
		o := off + int64(i)
		if c != byte(o*7+o>>10) {
			return false
		}
	}
	return true
}

// websocketSession opens a websocket to the program's echo, sends
// wsMessages messages and checks their echoes.
func websocketSession(ctx context.Context, client *http.Client, port int, ref string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, fmt.Sprintf("ws://127.0.0.1:%d/vm/%s/ws", port, ref), &websocket.DialOptions{HTTPClient: client})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return statusError(resp.StatusCode)
		}
		return errors.New(failure(err))
	}
	defer c.CloseNow()
	msg := make([]byte, wsMessage)
	for i := range wsMessages {
		msg[0] = byte(i)
		if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
			return errors.New("websocket write: " + failure(err))
		}
		_, got, err := c.Read(ctx)
		if err != nil {
			return errors.New("websocket read: " + failure(err))
		}
		if !bytes.Equal(got, msg) {
			return errors.New("wrong websocket echo")
		}
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return errSlowClose
		}
		return errors.New("websocket close: " + failure(err))
	}
	return nil
}

// errSlowClose is a websocket whose echoes all came back but whose close
// handshake took longer than coder/websocket waits for it (5 s): on this
// machine under the full load, a VM's answer can take that long.
var errSlowClose = errors.New("websocket close handshake over 5 s")

// nodeSample is the node's memory and files at a moment of the run.
type nodeSample struct {
	at     time.Duration
	rssKiB int
	fds    int
}

type nodeSamples struct {
	mu   sync.Mutex
	list []nodeSample
}

func (s *nodeSamples) take(t *testing.T, pid int, at time.Duration) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Errorf("read the node's status: %v", err)
		return
	}
	var rss int
	for line := range strings.SplitSeq(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rss, _ = strconv.Atoi(strings.Fields(v)[0])
		}
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	s.mu.Lock()
	s.list = append(s.list, nodeSample{at: at, rssKiB: rss, fds: len(fds)})
	s.mu.Unlock()
}

// every samples the node each d until the returned function is called.
func (s *nodeSamples) every(t *testing.T, pid int, d time.Duration) (stop func()) {
	done, stopped := make(chan struct{}), make(chan struct{})
	start := time.Now()
	go func() {
		defer close(stopped)
		tick := time.NewTicker(d)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				s.take(t, pid, time.Since(start))
			}
		}
	}()
	return func() { close(done); <-stopped }
}

// table lists the samples: the first before the load, the last once its
// clients left.
func (s *nodeSamples) table() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "node over time (first: before the load; last: 2 s after its clients left)\n%-8s %8s %6s\n", "t", "RSS MiB", "fds")
	for _, x := range s.list {
		fmt.Fprintf(&b, "%-8s %8.1f %6d\n", x.at.Round(time.Second), float64(x.rssKiB)/1024, x.fds)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// slowResults are what the slow clients saw.
type slowResults struct {
	slowloris   []slowOutcome
	slowReaders []slowOutcome
	stalled     []slowOutcome
}

// slowOutcome is one slow client's end: whether the node cut it, after
// how long, and what it read.
type slowOutcome struct {
	cut  bool
	took time.Duration
	read int64
	err  string
}

// runSlowloris opens n connections that send a request's headers one
// line a second and never end them; each should be closed by the node at
// its header timeout.
func runSlowloris(port int, ref string, n int) []slowOutcome {
	out := make([]slowOutcome, n)
	var wg sync.WaitGroup
	for i := range out {
		wg.Go(func() {
			start := time.Now()
			conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			if err != nil {
				out[i] = slowOutcome{err: err.Error()}
				return
			}
			defer conn.Close()
			closed := make(chan time.Duration, 1)
			go func() {
				io.Copy(io.Discard, conn)
				closed <- time.Since(start)
			}()
			fmt.Fprintf(conn, "GET /vm/%s/small HTTP/1.1\r\nHost: 127.0.0.1\r\n", ref)
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			limit := time.After(3 * loadHeaderTimeout)
			for line := 0; ; line++ {
				select {
				case took := <-closed:
					out[i] = slowOutcome{cut: true, took: took}
					return
				case <-limit:
					out[i] = slowOutcome{took: time.Since(start)}
					return
				case <-tick.C:
					fmt.Fprintf(conn, "X-Slow-%d: 1\r\n", line)
				}
			}
		})
	}
	wg.Wait()
	return out
}

// runSlowReaders asks n large answers and reads each steadily at
// slowRate: none should be cut.
func runSlowReaders(port int, refs []string, n int, size int64) []slowOutcome {
	out := make([]slowOutcome, n)
	var wg sync.WaitGroup
	for i := range out {
		wg.Go(func() {
			start := time.Now()
			client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
			resp, err := client.Get(programURL(port, refs[i%len(refs)], fmt.Sprintf("/large?size=%d", size)))
			if err != nil {
				out[i] = slowOutcome{err: failure(err)}
				return
			}
			defer resp.Body.Close()
			const piece = 16 << 10
			buf := make([]byte, piece)
			var read int64
			for read < size {
				n, err := io.ReadFull(resp.Body, buf[:min(piece, size-read)])
				if !patterned(buf[:n], read) {
					out[i] = slowOutcome{read: read, took: time.Since(start), err: "wrong bytes"}
					return
				}
				read += int64(n)
				if err != nil {
					out[i] = slowOutcome{cut: true, read: read, took: time.Since(start), err: failure(err)}
					return
				}
				// Steady: at read bytes, slowRate says how long it has been.
				if ahead := time.Duration(float64(read)/slowRate*float64(time.Second)) - time.Since(start); ahead > 0 {
					time.Sleep(ahead)
				}
			}
			out[i] = slowOutcome{read: read, took: time.Since(start), err: ""}
			if resp.StatusCode != 200 {
				out[i].err = statusError(resp.StatusCode).Error()
			}
		})
	}
	wg.Wait()
	return out
}

// runStalledReaders asks n huge answers, reads their first 64 KiB and
// stops reading; the node should cut each once its writes stall past its
// write timeout. After a pause the reader takes what the sockets hold:
// an answer cut short shows the node gave up.
func runStalledReaders(port int, refs []string, n int) []slowOutcome {
	out := make([]slowOutcome, n)
	var wg sync.WaitGroup
	for i := range out {
		wg.Go(func() {
			start := time.Now()
			conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			if err != nil {
				out[i] = slowOutcome{err: err.Error()}
				return
			}
			defer conn.Close()
			fmt.Fprintf(conn, "GET /vm/%s/large?size=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", refs[i%len(refs)], stalledSize)
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				out[i] = slowOutcome{err: failure(err)}
				return
			}
			read, _ := io.CopyN(io.Discard, resp.Body, 64<<10)
			time.Sleep(3*loadWriteTimeout + 5*time.Second)
			conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			rest, err := io.Copy(io.Discard, resp.Body)
			read += rest
			out[i] = slowOutcome{cut: read < stalledSize, read: read, took: time.Since(start)}
			if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
				out[i].err = failure(err)
			}
		})
	}
	wg.Wait()
	return out
}

// table sums up the slow clients.
func (s *slowResults) table(sizes loadSizes) string {
	summary := func(l []slowOutcome) (cut int, minTook, maxTook time.Duration, read int64, errs []string) {
		for i, o := range l {
			if o.cut {
				cut++
			}
			if i == 0 || o.took < minTook {
				minTook = o.took
			}
			maxTook = max(maxTook, o.took)
			read += o.read
			if o.err != "" {
				errs = append(errs, o.err)
			}
		}
		return
	}
	var b strings.Builder
	cut, lo, hi, _, errs := summary(s.slowloris)
	fmt.Fprintf(&b, "slowloris (headers never ended, header timeout %s): %d/%d cut, after %.1f-%.1f s%s\n",
		loadHeaderTimeout, cut, len(s.slowloris), lo.Seconds(), hi.Seconds(), errList(errs))
	cut, lo, hi, read, errs := summary(s.slowReaders)
	fmt.Fprintf(&b, "slow readers (%d MiB each at %d KiB/s, write timeout %s): %d/%d cut, %d MiB read in all, each in %.1f-%.1f s%s\n",
		sizes.slowSize>>20, slowRate>>10, loadWriteTimeout, cut, len(s.slowReaders), read>>20, lo.Seconds(), hi.Seconds(), errList(errs))
	cut, _, _, read, errs = summary(s.stalled)
	fmt.Fprintf(&b, "stalled readers (%d MiB asked, 64 KiB read, then nothing for %s): %d/%d cut, %.1f MiB read in all%s",
		stalledSize>>20, 3*loadWriteTimeout+5*time.Second, cut, len(s.stalled), float64(read)/(1<<20), errList(errs))
	return b.String()
}

// errList shows the slow clients' errors, if any.
func errList(errs []string) string {
	if len(errs) == 0 {
		return ""
	}
	return fmt.Sprintf("; errors: %q", errs)
}

// check fails the test where a slow client was not treated as it
// deserves.
func (s *slowResults) check(t *testing.T, sizes loadSizes) {
	t.Helper()
	for i, o := range s.slowloris {
		if !o.cut || o.err != "" || o.took > loadHeaderTimeout+3*time.Second {
			t.Errorf("slowloris %d: cut %v after %s (header timeout %s) %s", i, o.cut, o.took, loadHeaderTimeout, o.err)
		}
	}
	for i, o := range s.slowReaders {
		if o.cut || o.err != "" || o.read != sizes.slowSize {
			t.Errorf("slow reader %d: cut %v after %s, %d of %d bytes read: %s", i, o.cut, o.took, o.read, sizes.slowSize, o.err)
		}
	}
	for i, o := range s.stalled {
		if !o.cut || o.err != "" {
			t.Errorf("stalled reader %d: cut %v, %d of %d bytes read: %s", i, o.cut, o.read, stalledSize, o.err)
		}
	}
}

// overloadResult is what the overload part saw.
type overloadResult struct {
	refused int
	errs    []string
}

// runOverload deploys extra programs once the node's memory is taken by
// the running ones: each should be refused 503 with Retry-After, at once.
func runOverload(t *testing.T, env []string, port int, create func(int) string, running, extra int) overloadResult {
	var res overloadResult
	client := &http.Client{Timeout: time.Minute}
	for i := range extra {
		ref := create(running + i)
		start := time.Now()
		resp, err := client.Get(programURL(port, ref, "/small"))
		if err != nil {
			res.errs = append(res.errs, fmt.Sprintf("overload: program %d: %v", i, err))
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		retry := resp.Header.Get("Retry-After")
		if resp.StatusCode == http.StatusServiceUnavailable && retry != "" && time.Since(start) < 10*time.Second {
			res.refused++
			continue
		}
		res.errs = append(res.errs, fmt.Sprintf("overload: program %d past the node's memory: %d, Retry-After %q, in %s: %s",
			i, resp.StatusCode, retry, time.Since(start), body))
	}
	return res
}
