package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// These tests play a hostile guest against the host's Client: the node
// must keep its memory bounded, report a clear error and never spin,
// whatever the guest sends.

// heapMiB returns the live heap after a collection.
func heapMiB() float64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapAlloc) / (1 << 20)
}

// checkHeap fails the test when the live heap grew by more than maxMiB
// since before (generous: the bounds are a few MiB).
func checkHeap(t *testing.T, before, maxMiB float64) {
	t.Helper()
	after := heapMiB()
	t.Logf("live heap %.1f MiB -> %.1f MiB", before, after)
	if after-before > maxMiB {
		t.Errorf("live heap grew by %.1f MiB, more than %.0f", after-before, maxMiB)
	}
}

// fakeClock drives a throttle without sleeping: sleep advances the clock
// and adds to slept.
type fakeClock struct {
	now   time.Time
	slept time.Duration
}

func (c *fakeClock) throttle(rate, burst float64) *throttle {
	c.now = time.Unix(1e9, 0)
	return newThrottle(rate, burst, func() time.Time { return c.now }, func(d time.Duration) bool {
		c.now = c.now.Add(d)
		c.slept += d
		return true
	})
}

// unthrottled lets the tests flood the client at full speed.
func unthrottled() *throttle {
	return (&fakeClock{}).throttle(guestRate, guestBurst)
}

// hostileGuest answers the session's hello on conn, runs after (which
// may write anything and never return), then hands each later request to
// onRequest.
func hostileGuest(conn net.Conn, after func(w io.Writer), onRequest func(req request, w io.Writer)) {
	go func() {
		br := bufio.NewReaderSize(conn, 1<<20)
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			var req request
			if json.Unmarshal(line, &req) != nil || req.ID == 0 {
				continue
			}
			if req.Op == opHello {
				fmt.Fprintf(conn, `{"id":%d,"done":true,"hello":{"protocol":1,"init_version":"evil","status":{"state":"running"}}}`+"\n", req.ID)
				if after != nil {
					after(conn)
				}
				continue
			}
			if onRequest != nil {
				onRequest(req, conn)
			}
		}
	}()
}

func hostileClient(t *testing.T, conn net.Conn, limit *throttle) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := newClient(ctx, conn, limit)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitEnd waits for the client's reader to return, and checks that its
// events channel is closed and that a loop over it ends: nothing left
// running can spin.
func waitEnd(t *testing.T, c *Client) error {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(time.Minute):
		t.Fatal("the client's reader did not return")
	}
	drained := make(chan int)
	go func() {
		n := 0
		for range c.Events() {
			n++
		}
		drained <- n
	}()
	select {
	case n := <-drained:
		if n > eventBuffer {
			t.Errorf("%d events buffered, more than %d", n, eventBuffer)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Events is not closed after the connection ended")
	}
	if _, err := c.Status(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("a call after the end: %v, want ErrClosed", err)
	}
	return c.Err()
}

// unixPair returns both ends of a unix socket connection.
func unixPair(t *testing.T) (host, vm net.Conn) {
	t.Helper()
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	host, err = net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	vm = <-accepted
	t.Cleanup(func() { host.Close(); vm.Close() })
	return host, vm
}

// An endless line with no newline ends the session once it passes
// maxLine, with a protocol error, having read little more than maxLine.
func TestHostileEndlessLine(t *testing.T) {
	before := heapMiB()
	host, vm := unixPair(t)
	var written atomic.Int64
	hostileGuest(vm, func(w io.Writer) {
		chunk := []byte(strings.Repeat("x", 64<<10))
		for {
			n, err := w.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	}, nil)
	c := hostileClient(t, host, unthrottled())
	err := waitEnd(t, c)
	if !errors.Is(err, ErrProtocol) || !errors.Is(err, ErrClosed) || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("error %v, want a protocol error saying the line is too long", err)
	}
	t.Logf("%v after the guest wrote %d MiB", err, written.Load()>>20)
	// What the guest could write is bounded by the line limit plus the
	// socket's buffers, not endless.
	if w := written.Load(); w > maxLine+16<<20 {
		t.Errorf("the guest wrote %d bytes before the client gave up", w)
	}
	checkHeap(t, before, 32)
}

// A flood of lines just under the limit is read and dropped within
// bounds: log texts are cut, the log queue of a slow reader is bounded.
func TestHostileHugeLinesFlood(t *testing.T) {
	before := heapMiB()
	host, vm := net.Pipe()
	defer vm.Close()
	const lines = 16
	text := strings.Repeat("y", maxLine-200)
	hostileGuest(vm, nil, func(req request, w io.Writer) {
		if req.Op == opStatus {
			fmt.Fprintf(w, `{"id":%d,"done":true,"status":{"state":"running"}}`+"\n", req.ID)
			return
		}
		for i := range lines {
			fmt.Fprintf(w, `{"id":%d,"log":{"seq":%d,"stream":"stdout","text":"%s"}}`+"\n", req.ID, i+1, text)
		}
		fmt.Fprintf(w, `{"id":%d,"done":true}`+"\n", req.ID)
	})
	c := hostileClient(t, host, unthrottled())
	release := make(chan struct{})
	var got, longest int
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	go func() {
		time.Sleep(100 * time.Millisecond)
		// While the reader lags, the queue holds at most its bounds.
		if h := heapMiB(); h-before > 64 {
			t.Errorf("live heap %.1f MiB while the reader lags", h-before)
		}
		close(release)
	}()
	err := c.Logs(ctx, false, func(l LogLine) {
		<-release
		got++
		longest = max(longest, len(l.Text))
	})
	if err != nil {
		t.Fatal(err)
	}
	if longest > MaxLogText {
		t.Errorf("a log text of %d bytes, more than %d", longest, MaxLogText)
	}
	if got == 0 || got > lines {
		t.Errorf("%d lines", got)
	}
	if _, err := c.Status(ctx); err != nil {
		t.Errorf("the session ended with the flood: %v", err)
	}
	checkHeap(t, before, 32)
}

// A million small log lines to a reader that does not keep up: the
// client drops lines past its queue, never holding more than its bounds.
func TestHostileMillionLogLines(t *testing.T) {
	n := 1_000_000
	if testing.Short() {
		n = 100_000
	}
	before := heapMiB()
	host, vm := net.Pipe()
	defer vm.Close()
	hostileGuest(vm, nil, func(req request, w io.Writer) {
		if req.Op != opLogs {
			return
		}
		bw := bufio.NewWriterSize(w, 256<<10)
		for i := range n {
			fmt.Fprintf(bw, `{"id":%d,"log":{"seq":%d,"stream":"stdout","text":"line %d"}}`+"\n", req.ID, i+1, i)
		}
		fmt.Fprintf(bw, `{"id":%d,"done":true}`+"\n", req.ID)
		bw.Flush()
	})
	c := hostileClient(t, host, unthrottled())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var got int
	var peak float64
	err := c.Logs(ctx, false, func(l LogLine) {
		got++
		if got == 1 {
			// The reader stalls while the guest sends on.
			time.Sleep(500 * time.Millisecond)
			peak = heapMiB()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d of %d lines delivered; heap while stalled %.1f MiB over the start", got, n, peak-before)
	if got >= n {
		t.Errorf("no line dropped for a stalled reader (%d)", got)
	}
	if peak-before > 64 {
		t.Errorf("live heap %.1f MiB over the start while the reader stalled", peak-before)
	}
	checkHeap(t, before, 32)
}

// A guest that closes in the middle of a line ends the session with
// ErrClosed: calls under way fail, Events closes, nothing spins.
func TestHostileCloseMidFrame(t *testing.T) {
	host, vm := unixPair(t)
	hostileGuest(vm, nil, func(req request, w io.Writer) {
		fmt.Fprintf(w, `{"id":%d,"done":true,"status":{"sta`, req.ID)
		vm.Close()
	})
	c := hostileClient(t, host, unthrottled())
	_, err := c.Status(context.Background())
	if !errors.Is(err, ErrClosed) {
		t.Errorf("call cut by the close: %v", err)
	}
	if err := waitEnd(t, c); !errors.Is(err, ErrClosed) || errors.Is(err, ErrProtocol) {
		t.Errorf("end %v", err)
	}
	if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Errorf("close after the end: %v", err)
	}
	c.Close() // twice is fine
}

// Events nobody reads are dropped past the buffer; the status still
// follows them.
func TestHostileEventFlood(t *testing.T) {
	before := heapMiB()
	host, vm := net.Pipe()
	hostileGuest(vm, func(w io.Writer) {
		bw := bufio.NewWriter(w)
		for i := range 20_000 {
			fmt.Fprintf(bw, `{"event":{"type":"oom","status":{"state":"running","pid":%d,"error":"%s"}}}`+"\n", i+1, strings.Repeat("e", 1000))
		}
		bw.WriteString(`{"event":{"type":"exited","status":{"state":"exited","exit_code":9}}}` + "\n")
		bw.Flush()
		vm.Close()
	}, nil)
	c := hostileClient(t, host, unthrottled())
	if err := waitEnd(t, c); !errors.Is(err, ErrClosed) {
		t.Errorf("end %v", err)
	}
	st, _ := c.WaitFor(context.Background(), Settled)
	if st.State != StateExited {
		t.Errorf("status %+v", st)
	}
	checkHeap(t, before, 16)
}

// A guest that numbers its statuses wrongly (the largest seq first) can
// only hide its own later states from WaitFor, which it could do by never
// sending them; its events still reach Events, which the program's
// watcher reads to stop a VM whose workload ended, and WaitFor ends with
// its context.
func TestHostileStatusSeq(t *testing.T) {
	host, vm := net.Pipe()
	defer vm.Close()
	hostileGuest(vm, func(w io.Writer) {
		fmt.Fprintf(w, `{"event":{"type":"oom","status":{"state":"running","seq":%d}}}`+"\n", uint64(math.MaxUint64))
		io.WriteString(w, `{"event":{"type":"exited","status":{"state":"exited","exit_code":9,"seq":1}}}`+"\n")
	}, nil)
	c := hostileClient(t, host, unthrottled())
	var got []EventType
	for len(got) < 2 {
		select {
		case ev := <-c.Events():
			got = append(got, ev.Type)
		case <-time.After(5 * time.Second):
			t.Fatalf("events %v, want oom then exited", got)
		}
	}
	if got[1] != EventExited {
		t.Errorf("events %v, want oom then exited", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if st, err := c.WaitFor(ctx, Settled); !errors.Is(err, context.DeadlineExceeded) || st.State != StateRunning {
		t.Errorf("WaitFor: %+v, %v; want the status of the largest seq, running, until the deadline", st, err)
	}
}

// Texts past their bounds are cut, results past theirs refused, and the
// session goes on.
func TestHostileReplies(t *testing.T) {
	host, vm := net.Pipe()
	defer vm.Close()
	huge := strings.Repeat("z", 3<<20)
	hostileGuest(vm, nil, func(req request, w io.Writer) {
		var r reply
		switch {
		case req.Op == opSignal:
			r = reply{ID: req.ID, Done: true, Error: huge}
		case req.Op == opStatus:
			r = reply{ID: req.ID, Done: true, Status: &Status{State: StateFailed, Error: huge}}
		case req.Op == opExec:
			r = reply{ID: req.ID, Done: true, Exec: &ExecResult{Stdout: make([]byte, MaxExecOutput+1)}}
		case req.Op == opSysinfo:
			r = reply{ID: req.ID, Done: true, Sysinfo: &Sysinfo{Mounts: make([]MountUsage, maxSysinfoEntries+1)}}
		case req.Op == opLogs:
			fmt.Fprintf(w, `{"id":%d,"log":{"seq":1,"stream":"system","text":"the node says: all is well"}}`+"\n", req.ID)
			fmt.Fprintf(w, `{"id":%d,"log":{"seq":2,"stream":"stdout","text":"real"}}`+"\n", req.ID)
			r = reply{ID: req.ID, Done: true}
		}
		line, _ := json.Marshal(r)
		w.Write(append(line, '\n'))
	})
	c := hostileClient(t, host, unthrottled())
	ctx := context.Background()
	if err := c.Signal(ctx, 10); err == nil || len(err.Error()) > MaxErrorText+100 {
		t.Errorf("signal error of %d bytes", len(fmt.Sprint(err)))
	}
	if st, err := c.Status(ctx); err != nil || len(st.Error) > MaxErrorText {
		t.Errorf("status error of %d bytes, %v", len(st.Error), err)
	}
	if _, err := c.Exec(ctx, ExecRequest{Argv: []string{"x"}}); !errors.Is(err, ErrProtocol) {
		t.Errorf("oversized exec output: %v", err)
	}
	if _, err := c.Exec(ctx, ExecRequest{Argv: []string{"x"}, Stdin: make([]byte, MaxExecInput+1)}); err == nil {
		t.Error("oversized exec input sent")
	}
	if _, err := c.Sysinfo(ctx); !errors.Is(err, ErrProtocol) {
		t.Errorf("oversized sysinfo: %v", err)
	}
	var texts []string
	if err := c.Logs(ctx, false, func(l LogLine) { texts = append(texts, string(l.Stream)+" "+l.Text) }); err != nil {
		t.Fatal(err)
	}
	if strings.Join(texts, "|") != "stdout real" {
		t.Errorf("log lines %q: a guest may not write as the node", texts)
	}
	if c.Err() != nil {
		t.Errorf("the session ended: %v", c.Err())
	}
}

// The throttle makes a flooding guest wait: past the burst, the bytes it
// sends cost time at the rate.
func TestThrottleMakesAFloodWait(t *testing.T) {
	var clock fakeClock
	host, vm := net.Pipe()
	const flood = 64 << 20
	hostileGuest(vm, func(w io.Writer) {
		bw := bufio.NewWriterSize(w, 1<<20)
		line := `{"event":{"type":"oom","status":{"state":"running","error":"` + strings.Repeat("f", 64<<10) + `"}}}` + "\n"
		for sent := 0; sent < flood; sent += len(line) {
			bw.WriteString(line)
		}
		bw.Flush()
		vm.Close()
	}, nil)
	c := hostileClient(t, host, clock.throttle(8<<20, 16<<20))
	waitEnd(t, c)
	// 64 MiB at 8 MiB/s after a 16 MiB burst: at least 6 s of waiting.
	if want := 6 * time.Second; clock.slept < want {
		t.Errorf("the flood waited %v, want at least %v", clock.slept, want)
	}
	t.Logf("waited %v for %d MiB", clock.slept, flood>>20)
}

func TestThrottle(t *testing.T) {
	var clock fakeClock
	th := clock.throttle(100, 1000)
	for range 10 {
		th.spend(100) // the burst
	}
	if clock.slept != 0 {
		t.Errorf("slept %v within the burst", clock.slept)
	}
	th.spend(50)
	if clock.slept != 500*time.Millisecond {
		t.Errorf("slept %v, want 500ms", clock.slept)
	}
	clock.now = clock.now.Add(time.Hour)
	th.spend(1000) // refilled, but never past the burst
	if clock.slept != 500*time.Millisecond {
		t.Errorf("slept %v after a refill", clock.slept)
	}
	interrupted := newThrottle(1, 1, time.Now, func(time.Duration) bool { return false })
	if interrupted.spend(10) {
		t.Error("an interrupted wait reported success")
	}
}

// A state or an event type is a word; a guest that sends a megabyte there
// has it cut, as the other texts are, so that it is never kept or logged
// whole.
func TestHostileStateAndEventTypeAreCut(t *testing.T) {
	host, vm := net.Pipe()
	defer vm.Close()
	huge := strings.Repeat("s", 1<<20)
	hostileGuest(vm, func(w io.Writer) {
		line, _ := json.Marshal(reply{Event: &Event{Type: EventType(huge), Status: Status{State: State(huge)}}})
		w.Write(append(line, '\n'))
	}, func(req request, w io.Writer) {
		line, _ := json.Marshal(reply{ID: req.ID, Done: true, Status: &Status{State: State(huge)}})
		w.Write(append(line, '\n'))
	})
	c := hostileClient(t, host, unthrottled())
	select {
	case ev := <-c.Events():
		if len(ev.Type) > maxWordText || len(ev.Status.State) > maxWordText {
			t.Errorf("event type of %d bytes, state of %d", len(ev.Type), len(ev.Status.State))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	st, err := c.Status(context.Background())
	if err != nil || len(st.State) > maxWordText {
		t.Errorf("status state of %d bytes, %v", len(st.State), err)
	}
}
