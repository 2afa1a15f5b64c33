package guest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakeAgent is an Agent whose workload is driven by the test.
type fakeAgent struct {
	mu       sync.Mutex
	status   Status
	subs     []chan Event
	lines    []LogLine
	newLine  chan struct{}
	signals  []syscall.Signal
	halted   bool
	poweroff chan struct{}
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{status: Status{State: StateRunning, PID: 42}, newLine: make(chan struct{}), poweroff: make(chan struct{})}
}

func (a *fakeAgent) emit(ev Event) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.status = ev.Status
	for _, ch := range a.subs {
		ch <- ev
	}
}

func (a *fakeAgent) log(stream Stream, text string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.lines = append(a.lines, LogLine{Seq: uint64(len(a.lines) + 1), Stream: stream, Text: text, Time: time.Unix(0, 0).UTC()})
	close(a.newLine)
	a.newLine = make(chan struct{})
}

func (a *fakeAgent) Subscribe(ctx context.Context) (Status, <-chan Event) {
	a.mu.Lock()
	defer a.mu.Unlock()
	ch := make(chan Event, 16)
	a.subs = append(a.subs, ch)
	return a.status, ch
}

func (a *fakeAgent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status
}

func (a *fakeAgent) Logs(ctx context.Context, follow bool, fn func(LogLine) error) error {
	next := 0
	for {
		a.mu.Lock()
		pending, wake := a.lines[next:], a.newLine
		next = len(a.lines)
		a.mu.Unlock()
		for _, l := range pending {
			if err := fn(l); err != nil {
				return err
			}
		}
		if !follow {
			return nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (a *fakeAgent) Signal(sig syscall.Signal) error {
	if sig == syscall.SIGKILL {
		return errors.New("no workload")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.signals = append(a.signals, sig)
	return nil
}

func (a *fakeAgent) Exec(ctx context.Context, req ExecRequest) (ExecResult, error) {
	if req.Argv[0] == "sleep" {
		<-ctx.Done()
		return ExecResult{}, ctx.Err()
	}
	return ExecResult{ExitCode: 3, Stdout: []byte(strings.Join(req.Argv, " ") + "\n"), Stderr: []byte{0xff, 0}}, nil
}

func (a *fakeAgent) Sysinfo() (Sysinfo, error) {
	return Sysinfo{CPUs: 2, MemTotal: 1 << 30, Mounts: []MountUsage{{Path: "/", Total: 10}}}, nil
}

func (a *fakeAgent) Halt(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.halted = true
	a.status.State = StateHalting
	return nil
}

func (a *fakeAgent) PowerOff() { close(a.poweroff) }

// pipeSession serves one session of agent over a net.Pipe and returns the
// host's end.
func pipeSession(t *testing.T, agent Agent) net.Conn {
	host, vm := net.Pipe()
	done := make(chan error, 1)
	go func() {
		err := ServeSession(context.Background(), vm, vm, "test", agent)
		vm.Close()
		done <- err
	}()
	t.Cleanup(func() {
		host.Close()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return host
}

func newTestClient(t *testing.T, agent Agent) *Client {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := NewClient(ctx, pipeSession(t, agent))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestProtocol(t *testing.T) {
	agent := newFakeAgent()
	agent.log(Stdout, "first")
	agent.log(Stderr, "second")
	c := newTestClient(t, agent)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	if h := c.Hello(); h.Protocol != ProtocolVersion || h.InitVersion != "test" || h.Status.PID != 42 {
		t.Errorf("hello %+v", h)
	}
	if st, err := c.Status(ctx); err != nil || st.State != StateRunning {
		t.Errorf("status %+v %v", st, err)
	}

	var got []string
	if err := c.Logs(ctx, false, func(l LogLine) { got = append(got, fmt.Sprintf("%d %s %s", l.Seq, l.Stream, l.Text)) }); err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, "|") != "1 stdout first|2 stderr second" {
		t.Errorf("logs %q", got)
	}

	if err := c.Signal(ctx, syscall.SIGUSR1); err != nil {
		t.Error(err)
	}
	if err := c.Signal(ctx, syscall.SIGKILL); err == nil || !strings.Contains(err.Error(), "no workload") {
		t.Errorf("signal error: %v", err)
	}

	res, err := c.Exec(ctx, ExecRequest{Argv: []string{"echo", "hi"}})
	if err != nil || res.ExitCode != 3 || string(res.Stdout) != "echo hi\n" || string(res.Stderr) != "\xff\x00" {
		t.Errorf("exec %+v %v", res, err)
	}
	if _, err := c.Exec(ctx, ExecRequest{}); err == nil {
		t.Error("exec without argv succeeded")
	}

	info, err := c.Sysinfo(ctx)
	if err != nil || info.CPUs != 2 || info.Mounts[0].Path != "/" {
		t.Errorf("sysinfo %+v %v", info, err)
	}

	agent.emit(Event{Type: EventReady, Status: Status{State: StateReady, PID: 42}})
	select {
	case ev := <-c.Events():
		if ev.Type != EventReady {
			t.Errorf("event %+v", ev)
		}
	case <-ctx.Done():
		t.Fatal("no ready event")
	}
	if st, err := c.WaitFor(ctx, Settled); err != nil || st.State != StateReady {
		t.Errorf("wait %+v %v", st, err)
	}

	if err := c.Halt(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-agent.poweroff:
	case <-time.After(2 * time.Second):
		t.Fatal("no power off after halt")
	}
	if _, err := c.Status(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("after halt: %v", err)
	}
}

func TestConcurrentCalls(t *testing.T) {
	agent := newFakeAgent()
	c := newTestClient(t, agent)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	// A call that never ends does not hold up the others, and cancelling it
	// frees it on both sides.
	slow, stopSlow := context.WithCancel(ctx)
	slowDone := make(chan error)
	go func() {
		_, err := c.Exec(slow, ExecRequest{Argv: []string{"sleep"}})
		slowDone <- err
	}()
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := c.Exec(ctx, ExecRequest{Argv: []string{"echo", fmt.Sprint(i)}})
			if err != nil || string(res.Stdout) != fmt.Sprintf("echo %d\n", i) {
				t.Errorf("exec %d: %q %v", i, res.Stdout, err)
			}
		}()
	}
	wg.Wait()
	stopSlow()
	if err := <-slowDone; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled exec: %v", err)
	}
}

func TestLogsFollow(t *testing.T) {
	agent := newFakeAgent()
	agent.log(Stdout, "old")
	c := newTestClient(t, agent)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	follow, stop := context.WithCancel(ctx)
	lines := make(chan string, 10)
	done := make(chan error)
	go func() {
		done <- c.Logs(follow, true, func(l LogLine) { lines <- l.Text })
	}()
	if got := <-lines; got != "old" {
		t.Errorf("first line %q", got)
	}
	agent.log(Stdout, "new")
	if got := <-lines; got != "new" {
		t.Errorf("followed line %q", got)
	}
	stop()
	if err := <-done; err != nil {
		t.Errorf("stopping a follow: %v", err)
	}
	// The session still works after the cancel.
	if _, err := c.Status(ctx); err != nil {
		t.Error(err)
	}
}

func TestEventsReplayOnHello(t *testing.T) {
	agent := newFakeAgent()
	code := 3
	agent.status = Status{State: StateExited, ExitCode: &code}
	c := newTestClient(t, agent)
	st, err := c.WaitFor(context.Background(), Settled)
	if err != nil || st.ExitCode == nil || *st.ExitCode != 3 {
		t.Errorf("status from hello %+v %v", st, err)
	}
}

// TestGarbageIsIgnored checks that half lines left by an earlier session,
// in either direction, do not break a new one.
func TestGarbageIsIgnored(t *testing.T) {
	agent := newFakeAgent()
	host, vm := net.Pipe()
	defer host.Close()
	go ServeSession(context.Background(), vm, vm, "test", agent)
	go func() {
		// What the host reads first is the tail of an old reply.
		vm.Write([]byte(`":"stdout","text":"x"}}` + "\n"))
	}()
	br := bufio.NewReader(host)
	line, _ := br.ReadString('\n')
	if !strings.HasPrefix(line, `":"stdout"`) {
		t.Fatalf("read %q", line)
	}
	fmt.Fprint(host, `{"id":7,"op":"sta`+"\n"+`{"id":8,"op":"status"}`+"\n")
	line, _ = br.ReadString('\n')
	if !strings.Contains(line, `"id":8`) || !strings.Contains(line, `"state":"running"`) {
		t.Errorf("reply %q", line)
	}
}

func TestClientRejectsHugeLines(t *testing.T) {
	host, vm := net.Pipe()
	go func() {
		br := bufio.NewReader(vm)
		br.ReadString('\n')
		br.ReadString('\n')
		vm.Write([]byte(strings.Repeat("x", maxLine+128<<10)))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := NewClient(ctx, host)
	if err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("got %v", err)
	}
}

// staleAgent answers Status with the status it had before an event it
// emits meanwhile: the guest's answer computed just before the workload
// got ready, and written just after the event that says so.
type staleAgent struct {
	*fakeAgent
	ready func() // emits the event and waits until the host has it
}

func (a *staleAgent) Status() Status {
	st := a.fakeAgent.Status()
	if a.ready != nil {
		a.ready()
		a.ready = nil
	}
	return st
}

func TestStaleStatusAnswerIsNotKept(t *testing.T) {
	agent := &staleAgent{fakeAgent: newFakeAgent()}
	agent.status = Status{State: StateRunning, PID: 42, Seq: 1}
	c := newTestClient(t, agent)
	isReady := func(s Status) bool { return s.State == StateReady }
	agent.ready = func() {
		agent.emit(Event{Type: EventReady, Status: Status{State: StateReady, PID: 42, Seq: 2}})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := c.WaitFor(ctx, isReady); err != nil {
			t.Errorf("the ready event: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil || st.State != StateReady {
		t.Errorf("Status() = %+v, %v; want the later status, ready", st, err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if st, err := c.WaitFor(ctx, isReady); err != nil {
		t.Errorf("after a stale answer to Status, WaitFor(ready): %+v, %v", st, err)
	}
}

// TestWaitForAsksAgain checks that a state the host missed the event of
// (here, never sent) is seen by WaitFor's own asking.
func TestWaitForAsksAgain(t *testing.T) {
	agent := newFakeAgent()
	c := newTestClient(t, agent)
	c.refresh = 10 * time.Millisecond
	agent.mu.Lock()
	agent.status = Status{State: StateReady, PID: 42}
	agent.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if st, err := c.WaitFor(ctx, Settled); err != nil || st.State != StateReady {
		t.Errorf("WaitFor with no event: %+v, %v", st, err)
	}
}

// TestUnreadEventsKeepTheLast checks that events nobody reads lose their
// oldest, not the exit that came last.
func TestUnreadEventsKeepTheLast(t *testing.T) {
	agent := newFakeAgent()
	c := newTestClient(t, agent)
	for range 3 * eventBuffer {
		agent.emit(Event{Type: EventOOM, Status: Status{State: StateRunning, PID: 42, OOMKilled: true}})
	}
	code := 137
	agent.emit(Event{Type: EventExited, Status: Status{State: StateExited, ExitCode: &code, OOMKilled: true}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.WaitFor(ctx, Settled); err != nil {
		t.Fatal(err)
	}
	var last Event
	n := len(c.Events())
	for range n {
		last = <-c.Events()
	}
	if n != eventBuffer || last.Type != EventExited {
		t.Errorf("%d events kept, the last %s; want %d, the exit last", n, last.Type, eventBuffer)
	}
}
