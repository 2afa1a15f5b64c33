package main

import (
	"os/exec"
	"sync"

	"golang.org/x/sys/unix"
)

// reaper reaps every child of the init, its own and the orphans the
// kernel hands it, and gives the exit status of the processes it started
// to whoever waits for them. Starting a process and reaping hold the same
// lock, so a child cannot be reaped before its waiter is registered.
type reaper struct {
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
	reaped  uint64 // every child ever reaped, orphans included
}

func newReaper() *reaper {
	return &reaper{waiters: map[int]chan unix.WaitStatus{}}
}

// start starts cmd and returns a channel that receives its exit status.
// The caller must not call cmd.Wait.
func (r *reaper) start(cmd *exec.Cmd) (<-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[cmd.Process.Pid] = ch
	return ch, nil
}

// reap collects every child that has exited, and reports whether the
// init still has children.
func (r *reaper) reap() (children bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return false // ECHILD: none left
		case pid == 0:
			return true // some still run
		}
		r.reaped++
		if ch, ok := r.waiters[pid]; ok {
			ch <- ws
			delete(r.waiters, pid)
		}
	}
}

// exitCode is how the reference and fly report an exit: the status, or
// 128 + the signal.
func exitCode(ws unix.WaitStatus) (code, sig int) {
	if ws.Signaled() {
		return 128 + int(ws.Signal()), int(ws.Signal())
	}
	return ws.ExitStatus(), 0
}
