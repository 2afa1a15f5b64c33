package firecracker

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeVsock listens where Firecracker's vsock socket would be and runs
// serve on each connection after reading its CONNECT line.
func fakeVsock(t *testing.T, serve func(c net.Conn, connect string)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "v.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := bufio.NewReaderSize(c, 16).ReadString('\n')
				if err != nil {
					return
				}
				serve(c, line)
			}()
		}
	}()
	return path
}

func TestDialVsock(t *testing.T) {
	// The guest answers, then sends its own bytes at once: none may be
	// lost to the handshake.
	path := fakeVsock(t, func(c net.Conn, connect string) {
		if connect != "CONNECT 52\n" {
			io.WriteString(c, "ERR\n")
			return
		}
		io.WriteString(c, "OK 1073741824\nhello from the guest\n")
		line, _ := bufio.NewReader(c).ReadString('\n')
		io.WriteString(c, "echo "+line)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := DialVsock(ctx, path, 52)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	if line, _ := r.ReadString('\n'); line != "hello from the guest\n" {
		t.Errorf("first guest line %q", line)
	}
	io.WriteString(conn, "ping\n")
	if line, _ := r.ReadString('\n'); line != "echo ping\n" {
		t.Errorf("echo %q", line)
	}

	if _, err := DialVsock(ctx, path, 9); err == nil || !strings.Contains(err.Error(), `"ERR"`) {
		t.Errorf("unexpected answer: %v", err)
	}
}

func TestDialVsockRefused(t *testing.T) {
	// Firecracker closes the connection when the guest has no listener.
	path := fakeVsock(t, func(net.Conn, string) {})
	_, err := DialVsock(context.Background(), path, 52)
	if !errors.Is(err, ErrVsockRefused) {
		t.Errorf("got %v, want ErrVsockRefused", err)
	}
}

func TestDialVsockTimeout(t *testing.T) {
	// A guest that never answers: the handshake ends with ctx.
	block := make(chan struct{})
	t.Cleanup(func() { close(block) })
	path := fakeVsock(t, func(net.Conn, string) { <-block })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := DialVsock(ctx, path, 52)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want the deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v", d)
	}

	// Cancelled without a deadline, as when the caller gives up.
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if _, err := DialVsock(ctx, path, 52); !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want cancellation", err)
	}
}

func TestDialVsockNoSocket(t *testing.T) {
	if _, err := DialVsock(context.Background(), filepath.Join(t.TempDir(), "none"), 52); err == nil {
		t.Error("dialed a missing socket")
	}
}
