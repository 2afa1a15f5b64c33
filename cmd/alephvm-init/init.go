package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// Init is the running init: its configuration, the workload and what the
// control protocol sees of them. It implements guest.Agent.
type Init struct {
	cfg    guest.Config
	logs   *logRing
	reaper *reaper
	user   user // the workload's user, once the root is switched
	env    []string
	api    *guest.APIBridge

	mu        sync.Mutex
	state     guest.State
	pid       int
	exitCode  *int
	signal    int
	oom       bool
	errMsg    string
	boot      guest.Boot
	statusSeq uint64
	subs      map[chan guest.Event]struct{}
	rooted    bool // the root is switched: exec and sysinfo may run
	mounted   []string
	oomSeen   uint64
	exited    chan struct{} // closed when the workload has exited
	haltOnce  sync.Once
	haltErr   error
	// A template's: closed by Resume; and whether the control channel is
	// already served.
	resumed       chan struct{}
	controlServed bool
	networked     bool // a program's snapshot got its network
}

func newInit() *Init {
	return &Init{
		logs:   newLogRing(2000, 1<<20),
		reaper: newReaper(),
		state:  guest.StateStarting,
		subs:   map[chan guest.Event]struct{}{},
		exited: make(chan struct{}),
		api:    guest.NewAPIBridge(),
	}
}

// APIBridge implements guest.APIAgent: the guest API's calls go to the
// host through the control session that serves them.
func (in *Init) APIBridge() *guest.APIBridge { return in.api }

// trace logs a step of the boot with the time, in debug mode.
func (in *Init) trace(format string, args ...any) {
	if in.cfg.Debug {
		logf("%v %s", ms(uptime()), fmt.Sprintf(format, args...))
	}
}

// milestone records a step of the boot.
func (in *Init) milestone(set func(*guest.Boot)) {
	in.mu.Lock()
	defer in.mu.Unlock()
	set(&in.boot)
}

// recordKernelHandoff finds in the kernel log when the kernel ran the
// init ("Run /init as init process", kept even with quiet).
func (in *Init) recordKernelHandoff() {
	f, err := os.OpenFile("/dev/kmsg", os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return
	}
	defer f.Close()
	buf := make([]byte, 8192)
	for {
		n, err := unix.Read(int(f.Fd()), buf)
		if err == unix.EPIPE {
			continue // records were overwritten before we read them
		}
		if err != nil || n <= 0 {
			return
		}
		if at, ok := parseKmsgRun(string(buf[:n])); ok {
			in.milestone(func(b *guest.Boot) { b.Kernel = at })
			return
		}
	}
}

// parseKmsgRun reads a /dev/kmsg record ("prio,seq,usec,flags;text") and
// returns its time if it is the kernel's "Run /init" line.
func parseKmsgRun(record string) (time.Duration, bool) {
	head, text, ok := strings.Cut(record, ";")
	if !ok || !strings.HasPrefix(text, "Run /init as init process") {
		return 0, false
	}
	f := strings.Split(head, ",")
	if len(f) < 3 {
		return 0, false
	}
	usec, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		return 0, false
	}
	return time.Duration(usec) * time.Microsecond, true
}

// Status implements guest.Agent.
func (in *Init) Status() guest.Status {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.statusLocked()
}

// statusLocked numbers each status it makes (Seq), so that the host keeps
// the later of two it receives out of order.
func (in *Init) statusLocked() guest.Status {
	in.statusSeq++
	return guest.Status{State: in.state, PID: in.pid, ExitCode: in.exitCode, Signal: in.signal, OOMKilled: in.oom, Error: in.errMsg, Boot: in.boot, Seq: in.statusSeq}
}

// Subscribe implements guest.Agent.
func (in *Init) Subscribe(ctx context.Context) (guest.Status, <-chan guest.Event) {
	ch := make(chan guest.Event, 16)
	in.mu.Lock()
	in.subs[ch] = struct{}{}
	st := in.statusLocked()
	in.mu.Unlock()
	goSafe(func() {
		<-ctx.Done()
		in.mu.Lock()
		delete(in.subs, ch)
		close(ch)
		in.mu.Unlock()
	})
	return st, ch
}

// emitLocked sends an event with the current status to every subscriber.
// A subscriber too slow to take it (a host that reads no more, after a
// storm of OOM events) loses its oldest event, not this one: the host
// waits on events (guest.Client.WaitFor), and the last one holds the state
// it waits for, such as the workload's exit.
func (in *Init) emitLocked(t guest.EventType) {
	ev := guest.Event{Type: t, Status: in.statusLocked()}
	for ch := range in.subs {
		guest.QueueEvent(ch, ev) // emitLocked, under in.mu, is its only sender
	}
}

// failed records that the workload cannot be started; the init keeps
// serving the control channel so the host can read why and halt.
func (in *Init) failed(err error) {
	logf("%v", err)
	in.mu.Lock()
	defer in.mu.Unlock()
	in.state = guest.StateFailed
	in.errMsg = err.Error()
	in.emitLocked(guest.EventFailed)
}

// Logs implements guest.Agent.
func (in *Init) Logs(ctx context.Context, follow bool, fn func(guest.LogLine) error) error {
	return in.logs.read(ctx, follow, fn)
}

// Signal implements guest.Agent: it signals the workload's main process.
func (in *Init) Signal(sig syscall.Signal) error {
	in.mu.Lock()
	pid, state := in.pid, in.state
	in.mu.Unlock()
	if pid == 0 || state == guest.StateExited {
		return fmt.Errorf("no workload running (%s)", state)
	}
	if err := unix.Kill(pid, sig); err != nil {
		return fmt.Errorf("signal %d to pid %d: %w", sig, pid, err)
	}
	return nil
}

// supervise is the init's main loop: it reaps every child, forwards the
// signals the init receives to the workload, and halts on a request from
// the kernel (ctrl-alt-del, power failure). It never returns.
func (in *Init) supervise() {
	// With ctrl-alt-del disabled the kernel sends SIGINT to the init, which
	// is how a Firecracker host asks for a clean stop.
	unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGINT, unix.SIGPWR, unix.SIGTERM, unix.SIGHUP, unix.SIGUSR1, unix.SIGUSR2, unix.SIGQUIT)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case s := <-sigs:
			switch s {
			case unix.SIGCHLD:
				in.reaper.reap()
			case unix.SIGINT, unix.SIGPWR:
				logf("%v: halting", s)
				goSafe(func() {
					if err := in.Halt(context.Background()); err != nil {
						logf("halt: %v", err)
					}
					in.PowerOff()
				})
			default:
				in.Signal(s.(syscall.Signal))
			}
		case <-tick.C:
			in.reaper.reap()
			in.checkOOM()
		}
	}
}

// Halt implements guest.Agent: it stops the workload (SIGTERM, then
// SIGKILL after a grace period) and every other process, then unmounts the
// drives. It runs once; later calls return the first one's result.
func (in *Init) Halt(ctx context.Context) error {
	in.haltOnce.Do(func() { in.haltErr = in.halt() })
	return in.haltErr
}

// haltGrace is how long the workload has to exit after SIGTERM.
const haltGrace = 5 * time.Second

func (in *Init) halt() error {
	in.mu.Lock()
	pid, state := in.pid, in.state
	in.state = guest.StateHalting
	in.mu.Unlock()
	if pid != 0 && state != guest.StateExited {
		unix.Kill(pid, unix.SIGTERM)
		select {
		case <-in.exited:
		case <-time.After(haltGrace):
			logf("workload did not exit %v after SIGTERM: killing it", haltGrace)
		}
	}
	// Every process but this one.
	unix.Kill(-1, unix.SIGKILL)
	deadline := time.Now().Add(2 * time.Second)
	for in.reaper.reap() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	unix.Sync()
	var errs []error
	in.mu.Lock()
	mounted := in.mounted
	in.mu.Unlock()
	for i := len(mounted) - 1; i >= 0; i-- {
		if err := unmount(mounted[i]); err != nil {
			errs = append(errs, err)
		}
	}
	unix.Sync()
	return errors.Join(errs...)
}

// PowerOff implements guest.Agent.
func (in *Init) PowerOff() {
	powerOff(in.cfg.Halt)
}

// unmount unmounts path, retrying while it is busy, and detaches it as a
// last resort.
func unmount(path string) error {
	var err error
	for range 5 {
		if err = unix.Unmount(path, 0); err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	unix.Unmount(path, unix.MNT_DETACH)
	return fmt.Errorf("unmount %s: %w (detached)", path, err)
}
