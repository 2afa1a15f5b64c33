package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// FakeFirecracker builds internal/fakefirecracker, static, as
// "firecracker" with "jailer" beside it (the fake plays both by its
// arguments), for tests of the Firecracker code paths where no
// Firecracker runs.
func FakeFirecracker(t testing.TB) (firecracker, jailer string) {
	t.Helper()
	RequireTools(t, "go")
	dir := t.TempDir()
	firecracker, jailer = filepath.Join(dir, "firecracker"), filepath.Join(dir, "jailer")
	cmd := exec.Command("go", "build", "-o", firecracker, "github.com/alephvm/alephvm/internal/fakefirecracker")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the fake firecracker: %v\n%s", err, out)
	}
	if err := os.Symlink(firecracker, jailer); err != nil {
		t.Fatal(err)
	}
	return firecracker, jailer
}
