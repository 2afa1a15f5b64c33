package hostcheck

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeQEMU writes a qemu-system-x86_64 that answers --version and
// accepts -sandbox or not.
func fakeQEMU(t *testing.T, sandbox bool) string {
	t.Helper()
	refuse := `echo "qemu-system-x86_64: -sandbox on: There is no option group 'sandbox'" >&2; exit 1`
	if sandbox {
		refuse = `exit 0`
	}
	script := "#!/bin/sh\ncase \"$1\" in\n--version) echo 'QEMU emulator version 7.2.22'; exit 0;;\n-sandbox) " + refuse + ";;\nesac\nexit 2\n"
	path := filepath.Join(t.TempDir(), "qemu-system-x86_64")
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestProbeQEMUSandbox(t *testing.T) {
	ctx := context.Background()
	if p := probeQEMU(ctx, fakeQEMU(t, true)); !p.OK || !strings.Contains(p.Found, "seccomp sandbox") {
		t.Errorf("a QEMU with its sandbox: %+v", p)
	}
	if p := probeQEMU(ctx, fakeQEMU(t, false)); p.OK || !strings.Contains(p.Found, "no seccomp sandbox") || !strings.Contains(p.Found, "no option group") {
		t.Errorf("a QEMU without a sandbox: %+v", p)
	}
	if p := probeQEMU(ctx, filepath.Join(t.TempDir(), "missing")); p.OK {
		t.Errorf("a missing QEMU: %+v", p)
	}
}
