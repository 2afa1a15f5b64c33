package guest

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"
)

// DialSerial connects to the unix socket QEMU serves for the control
// port:
//
//	-device virtio-serial-pci
//	-chardev socket,id=control,path=PATH,server=on,wait=off
//	-device virtserialport,chardev=control,name=org.alephvm.control
//
// QEMU takes one connection at a time; the guest sees a new session when
// the previous one is closed.
func DialSerial(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("dial guest control socket: %w", err)
	}
	return conn, nil
}

// DialVsock connects to a guest vsock port through Firecracker's vsock
// unix socket (vsock.uds_path): it writes "CONNECT <port>\n" and expects
// "OK <host port>\n" back. The guest listens on ControlVsockPort.
func DialVsock(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", udsPath)
	if err != nil {
		return nil, fmt.Errorf("dial vsock socket: %w", err)
	}
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	} else {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
	}
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		conn.Close()
		return nil, fmt.Errorf("vsock connect to port %d: %w", port, err)
	}
	// Read the answer one byte at a time so that nothing after it is
	// consumed from the stream.
	var line strings.Builder
	b := make([]byte, 1)
	for line.Len() < 64 {
		if _, err := conn.Read(b); err != nil {
			conn.Close()
			return nil, fmt.Errorf("vsock connect to port %d: %w", port, err)
		}
		if b[0] == '\n' {
			break
		}
		line.WriteByte(b[0])
	}
	if !strings.HasPrefix(line.String(), "OK ") {
		conn.Close()
		return nil, fmt.Errorf("vsock connect to port %d: got %q", port, line.String())
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}
