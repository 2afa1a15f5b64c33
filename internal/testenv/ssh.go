package testenv

import (
	"context"
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

// SSH runs command as root on host with key, trusting any host key.
func SSH(key, host, command string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "root@"+host, command)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
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
