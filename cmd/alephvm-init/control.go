package main

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/alephvm/alephvm/guest"
)

// serveControl opens the control channel: the named virtio-serial port
// when the VM has a virtio console (QEMU), a vsock listener when it has a
// vsock device (Firecracker).
func (in *Init) serveControl(have devices) {
	ctx := context.Background()
	if have.console {
		if port, err := findPort(guest.ControlPortName, 2*time.Second); err != nil {
			logf("control port: %v", err)
		} else if f, err := os.OpenFile(port, os.O_RDWR, 0); err != nil {
			logf("control port: %v", err)
		} else {
			in.milestone(func(b *guest.Boot) { b.Control = uptime() })
			goSafe(func() { in.serveSerial(ctx, f) })
		}
	}
	if have.vsock {
		l, err := vsock.Listen(guest.ControlVsockPort, nil)
		if err != nil {
			logf("control vsock port %d: %v", guest.ControlVsockPort, err)
			return
		}
		in.milestone(func(b *guest.Boot) { b.Control = uptime() })
		goSafe(func() {
			for {
				conn, err := l.Accept()
				if err != nil {
					logf("control vsock: %v", err)
					return
				}
				goSafe(func() {
					defer conn.Close()
					guest.ServeSession(ctx, conn, conn, initVersion(), guardedAgent{in})
				})
			}
		})
	}
}

// findPort waits for the virtio-serial port of that name to appear (its
// name comes from the host a moment after the device) and returns its
// device path.
func findPort(name string, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		ports, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, p := range ports {
			b, err := os.ReadFile(p)
			if err == nil && strings.TrimSpace(string(b)) == name {
				return "/dev/" + filepath.Base(filepath.Dir(p)), nil
			}
		}
		if time.Now().After(deadline) {
			return "", errors.New("no virtio-serial port named " + name)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// serialIdle is how often the init looks for a host on an unconnected
// port: reads return end-of-file until a host connects.
const serialIdle = 20 * time.Millisecond

// serveSerial serves sessions on a virtio-serial port, one after the
// other: a session starts with the first bytes from a host and ends when
// the host disconnects, which reads show as end-of-file.
func (in *Init) serveSerial(ctx context.Context, port *os.File) {
	w := &lockedWriter{w: port}
	buf := make([]byte, 64<<10)
	var session *io.PipeWriter
	for {
		n, err := port.Read(buf)
		if n > 0 {
			if session == nil {
				r, pw := io.Pipe()
				session = pw
				goSafe(func() {
					guest.ServeSession(ctx, r, w, initVersion(), guardedAgent{in})
					r.Close()
				})
			}
			if _, err := session.Write(buf[:n]); err != nil {
				session = nil // the session ended on its own; the next bytes start another
			}
		}
		if err != nil {
			if session != nil {
				session.Close()
				session = nil
			}
			if !errors.Is(err, io.EOF) {
				logf("control port: %v", err)
			}
			time.Sleep(serialIdle)
		}
	}
}

// lockedWriter keeps the lines of successive sessions on one port whole.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
