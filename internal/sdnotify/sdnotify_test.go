package sdnotify

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func receive(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

func TestNotify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify")
	conn := listen(t, path)
	if err := Notify(path, Ready, "STATUS=serving"); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, conn); got != "READY=1\nSTATUS=serving\n" {
		t.Errorf("received %q", got)
	}

	abstract := fmt.Sprintf("@alephvm-sdnotify-test-%d", os.Getpid())
	conn = listen(t, abstract)
	if err := Notify(abstract, Stopping); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, conn); got != "STOPPING=1\n" {
		t.Errorf("abstract socket received %q", got)
	}
}

func TestNotifyWithoutManager(t *testing.T) {
	if err := Notify("", Ready); err != nil {
		t.Errorf("no socket: %v", err)
	}
	if got := Socket([]string{"PATH=/bin"}); got != "" {
		t.Errorf("socket %q from an environment without one", got)
	}
	if got := Socket([]string{"NOTIFY_SOCKET=/run/a", "NOTIFY_SOCKET_X=1", "NOTIFY_SOCKET=/run/b"}); got != "/run/b" {
		t.Errorf("socket %q, want the last one", got)
	}
}

// TestNotifyRefuses takes hostile values of NOTIFY_SOCKET and states.
func TestNotifyRefuses(t *testing.T) {
	for _, tc := range []struct {
		socket string
		states []string
		want   string
	}{
		{"relative/sock", []string{Ready}, "neither an absolute path"},
		{filepath.Join(t.TempDir(), "none"), []string{Ready}, "notify systemd"},
		{"/run/x", []string{"READY=1\nMAINPID=1"}, "not one VARIABLE=value line"},
		{"/run/x", []string{"READY"}, "not one VARIABLE=value line"},
	} {
		err := Notify(tc.socket, tc.states...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q %q: %v, want %q", tc.socket, tc.states, err, tc.want)
		}
	}
}
