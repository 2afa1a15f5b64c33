package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrVsockRefused is returned by DialVsock when Firecracker closes the
// connection instead of answering OK: nothing in the guest listens on the
// port (yet).
var ErrVsockRefused = errors.New("vsock: connection refused by the guest")

// vsockHandshakeTimeout bounds the handshake when ctx has no deadline.
const vsockHandshakeTimeout = 10 * time.Second

// DialVsock connects to port on the guest through the host end of
// Firecracker's vsock device, the unix socket uds (vsock.uds_path): it
// writes "CONNECT <port>\n" and expects "OK <host port>\n". The returned
// connection carries the guest's stream from the first byte after that
// line.
func DialVsock(ctx context.Context, uds string, port uint32) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", uds)
	if err != nil {
		return nil, fmt.Errorf("vsock dial port %d: %w", port, err)
	}
	deadline, hasDeadline := ctx.Deadline()
	if !hasDeadline {
		deadline = time.Now().Add(vsockHandshakeTimeout)
	}
	_ = conn.SetDeadline(deadline)
	// A cancelled ctx interrupts a handshake in progress.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	line, err := handshake(conn, port)
	stop()
	if err == nil {
		err = conn.SetDeadline(time.Time{})
	}
	if err != nil {
		conn.Close()
		switch {
		case ctx.Err() != nil:
			err = ctx.Err()
		case hasDeadline && errors.Is(err, os.ErrDeadlineExceeded):
			err = context.DeadlineExceeded // ctx's deadline, as the connection saw it
		}
		return nil, fmt.Errorf("vsock connect to port %d through %s: %w", port, uds, err)
	}
	if !strings.HasPrefix(line, "OK ") {
		conn.Close()
		return nil, fmt.Errorf("vsock connect to port %d: unexpected answer %q", port, line)
	}
	if _, err := strconv.ParseUint(strings.TrimPrefix(line, "OK "), 10, 32); err != nil {
		conn.Close()
		return nil, fmt.Errorf("vsock connect to port %d: unexpected answer %q", port, line)
	}
	return conn, nil
}

// handshake sends CONNECT and reads the answer line one byte at a time, so
// that none of the guest's own bytes after it are consumed.
func handshake(conn net.Conn, port uint32) (string, error) {
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return "", err
	}
	var line []byte
	b := make([]byte, 1)
	for len(line) < 64 {
		if _, err := conn.Read(b); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
				return "", ErrVsockRefused
			}
			return "", err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return "", fmt.Errorf("answer %q... is too long", line)
}
