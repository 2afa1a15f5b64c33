package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/guest"
)

const panicChildEnv = "ALEPHVM_INIT_PANIC_CHILD"

// panicChild runs this test binary again as the child of a panic test:
// with pid, as PID 1 of a PID namespace of its own, where the init's
// power-off only ends that namespace. Both children get a network
// namespace of their own, so that nothing the test harness does there
// touches the host.
func panicChild(t *testing.T, test, mode string, pid bool) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("namespaces need root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.short", "-test.count=1")
	cmd.Env = append(os.Environ(), panicChildEnv+"="+mode, "ALEPHVM_TEST_NETNS=1")
	flags := uintptr(syscall.CLONE_NEWNET)
	if pid {
		flags |= syscall.CLONE_NEWPID
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: flags}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// runPanicChild is the child's side: it panics the way mode says and
// waits for what follows.
func runPanicChild(mode string) {
	switch mode {
	case "goroutine":
		goSafe(func() { panic("boom in a goroutine") })
	case "agent":
		go guardedAgent{panicking{}}.Status()
	}
	time.Sleep(30 * time.Second)
	os.Exit(0) // not reached: the panic ended the process
}

// panicking is an agent whose Status panics, as a bug in the init would.
type panicking struct{ guest.Agent }

func (panicking) Status() guest.Status { panic("boom in a control call") }

// As PID 1, a panic in a goroutine the init started, or in a call the
// control server makes into the init, powers the VM off with the reason
// on the console. In a PID namespace of its own the power-off ends the
// namespace's init with SIGINT, which is what the test sees.
func TestPanicPowersOff(t *testing.T) {
	if mode := os.Getenv(panicChildEnv); mode != "" {
		runPanicChild(mode)
	}
	for mode, reason := range map[string]string{"goroutine": "boom in a goroutine", "agent": "boom in a control call"} {
		out, err := panicChild(t, "TestPanicPowersOff", mode, true)
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGINT {
			t.Errorf("%s: the init was not powered off: %v\n%s", mode, err, out)
		}
		if !strings.Contains(out, "alephvm-init: panic: "+reason) || !strings.Contains(out, "goroutine") {
			t.Errorf("%s: no reason and stack on the console:\n%s", mode, out)
		}
	}
}

// Outside a VM (not PID 1) a guarded panic is not swallowed, and nothing
// is powered off: the process dies of it as any Go program.
func TestPanicOutsideAVM(t *testing.T) {
	if mode := os.Getenv(panicChildEnv); mode != "" {
		runPanicChild(mode)
	}
	out, err := panicChild(t, "TestPanicOutsideAVM", "goroutine", false)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(out, "panic: boom in a goroutine") {
		t.Errorf("%v\n%s", err, out)
	}
	if strings.Contains(out, "alephvm-init: panic") {
		t.Errorf("powered off outside a VM:\n%s", out)
	}
}
