package testenv

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// SSHKey makes an ed25519 key pair for the test and returns the private
// key's path and the public key.
func SSHKey(t testing.TB) (private, public string) {
	t.Helper()
	RequireTools(t, "ssh-keygen", "ssh")
	private = filepath.Join(t.TempDir(), "id_ed25519")
	Cmd(t, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", private)
	pub, err := os.ReadFile(private + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	return private, strings.TrimSpace(string(pub))
}

// SSH runs command on host with key, trusting any host key, as root
// unless host is written user@host. A
// starved TCG guest can take more than a few seconds for the banner
// exchange, so a connection that failed before the command ran (ssh's exit
// 255 with a connect or banner error) is tried twice more.
func SSH(key, host, command string) (string, error) {
	var out string
	var err error
	for try := 0; try < 3; try++ {
		out, err = sshOnce(key, host, command)
		if !sshConnectFailed(out, err) {
			break
		}
	}
	return out, err
}

func sshOnce(key, host, command string) (string, error) {
	if !strings.Contains(host, "@") {
		host = "root@" + host
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "ConnectTimeout=10", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", host, command)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// sshConnectFailed tells a connection that never reached the command from
// a command that failed.
func sshConnectFailed(out string, err error) bool {
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 255 {
		return false
	}
	for _, s := range []string{"banner exchange", "Connection timed out", "Connection refused", "Connection reset", "closed by remote host", "No route to host"} {
		if strings.Contains(out, s) {
			return true
		}
	}
	return false
}

// WaitSSH waits until host answers over SSH and its cloud-init is done,
// and returns how long that took.
func WaitSSH(t testing.TB, key, host string, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if _, err := SSH(key, host, "cloud-init status --wait >/dev/null; true"); err == nil {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("no SSH on %s after %s", host, timeout)
		}
		time.Sleep(2 * time.Second)
	}
}
