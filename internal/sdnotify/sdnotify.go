// Package sdnotify tells systemd how a Type=notify service is doing: that
// it is ready (the node listens, its VMs taken back) and that it is
// stopping. See sd_notify(3).
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"strings"
)

// Env names the environment variable systemd gives a Type=notify service:
// the datagram socket to write states to.
const Env = "NOTIFY_SOCKET"

// States a service sends.
const (
	Ready    = "READY=1"
	Stopping = "STOPPING=1"
)

// Socket returns the notification socket named in environ, or "" when the
// process was not started by systemd as a Type=notify service.
func Socket(environ []string) string {
	socket := ""
	for _, kv := range environ {
		if v, ok := strings.CutPrefix(kv, Env+"="); ok {
			socket = v
		}
	}
	return socket
}

// Notify sends the states (such as Ready, or "STATUS=text") to socket, as
// one datagram. An empty socket means no service manager listens: nothing
// is sent. The socket must be an absolute path or an abstract name
// starting with @, as systemd gives.
func Notify(socket string, states ...string) error {
	if socket == "" {
		return nil
	}
	if !strings.HasPrefix(socket, "/") && !strings.HasPrefix(socket, "@") {
		return fmt.Errorf("notify systemd: %s=%q is neither an absolute path nor an abstract socket", Env, socket)
	}
	for _, s := range states {
		if strings.Contains(s, "\n") || !strings.Contains(s, "=") {
			return fmt.Errorf("notify systemd: %q is not one VARIABLE=value line", s)
		}
	}
	// Go's unix addresses treat a leading @ as Linux's abstract namespace.
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: socket, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notify systemd: %w", err)
	}
	defer conn.Close()
	msg := strings.Join(states, "\n") + "\n"
	n, err := conn.Write([]byte(msg))
	if err == nil && n != len(msg) {
		err = errors.New("short write")
	}
	if err != nil {
		return fmt.Errorf("notify systemd: %w", err)
	}
	return nil
}
