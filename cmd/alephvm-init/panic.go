package main

import (
	"context"
	"errors"
	"os"
	"runtime/debug"
	"syscall"

	"github.com/alephvm/alephvm/guest"
)

// A Go program dies of a panic in any of its goroutines, and PID 1 dying
// is a kernel panic. So the init's code never runs unguarded: boot's own
// goroutine, every goroutine the init starts (goSafe) and every call the
// control protocol's server makes into the init (guardedAgent) recover a
// panic and power the VM off with the reason and the stack on the
// console. A panic in a goroutine of a library (the guest package's
// server, vsock) still ends PID 1: Go prints it on the console, the kernel
// panics, and panic=1 on the command line ends the VM.

// goSafe runs fn in a goroutine of its own, guarded.
func goSafe(fn func()) {
	go func() {
		defer recoverPanic()
		fn()
	}()
}

// recoverPanic, deferred, turns a panic into a power-off with its reason
// on the console. Outside a VM (not PID 1, as in the tests) it lets the
// panic go on: there is nothing to power off.
func recoverPanic() {
	r := recover()
	if r == nil {
		return
	}
	if os.Getpid() != 1 {
		panic(r)
	}
	logf("panic: %v\n%s", r, debug.Stack())
	powerOff(guest.HaltPowerOff)
}

// guardedAgent is the init as the control protocol's server calls it:
// each call guarded.
type guardedAgent struct{ in guest.Agent }

func (g guardedAgent) Subscribe(ctx context.Context) (guest.Status, <-chan guest.Event) {
	defer recoverPanic()
	return g.in.Subscribe(ctx)
}

func (g guardedAgent) APIBridge() *guest.APIBridge {
	if a, ok := g.in.(guest.APIAgent); ok {
		return a.APIBridge()
	}
	return nil
}

func (g guardedAgent) DeliverEvent(ctx context.Context, body []byte) error {
	defer recoverPanic()
	if a, ok := g.in.(guest.EventAgent); ok {
		return a.DeliverEvent(ctx, body)
	}
	return errors.New("this init takes no events")
}

func (g guardedAgent) Resume(ctx context.Context, req guest.ResumeRequest) error {
	defer recoverPanic()
	if a, ok := g.in.(guest.ResumeAgent); ok {
		return a.Resume(ctx, req)
	}
	return errors.New("this init cannot be resumed")
}

func (g guardedAgent) Status() guest.Status {
	defer recoverPanic()
	return g.in.Status()
}

func (g guardedAgent) Logs(ctx context.Context, follow bool, fn func(guest.LogLine) error) error {
	defer recoverPanic()
	return g.in.Logs(ctx, follow, fn)
}

func (g guardedAgent) Signal(sig syscall.Signal) error {
	defer recoverPanic()
	return g.in.Signal(sig)
}

func (g guardedAgent) Exec(ctx context.Context, req guest.ExecRequest) (guest.ExecResult, error) {
	defer recoverPanic()
	return g.in.Exec(ctx, req)
}

func (g guardedAgent) Sysinfo() (guest.Sysinfo, error) {
	defer recoverPanic()
	return g.in.Sysinfo()
}

func (g guardedAgent) Halt(ctx context.Context) error {
	defer recoverPanic()
	return g.in.Halt(ctx)
}

func (g guardedAgent) PowerOff() {
	defer recoverPanic()
	g.in.PowerOff()
}
