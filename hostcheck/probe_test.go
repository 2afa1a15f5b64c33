package hostcheck

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
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

func TestProbeKVM(t *testing.T) {
	ctx := context.Background()
	if p := probeKVM(ctx, filepath.Join(t.TempDir(), "kvm"), "qemu-system-x86_64", true); p.OK || !strings.Contains(p.Found, "no ") {
		t.Errorf("no device: %+v", p)
	}
	// A device node that is not KVM's (a file here) does not answer as KVM.
	notKVM := filepath.Join(t.TempDir(), "kvm")
	os.WriteFile(notKVM, nil, 0o600)
	if p := probeKVM(ctx, notKVM, "qemu-system-x86_64", true); p.OK || !strings.Contains(p.Found, "does not answer as KVM") {
		t.Errorf("not KVM: %+v", p)
	}

	f, err := os.OpenFile(kvmDevice, os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no usable %s here for the rest: %v", kvmDevice, err)
	}
	f.Close()
	if p := probeKVM(ctx, kvmDevice, "qemu-system-x86_64", false); p.OK || !strings.Contains(p.Found, "unknown") {
		t.Errorf("without QEMU: %+v", p)
	}
	// The probe guest's verdict is QEMU's exit status: a QEMU that fails
	// (as under KVM that runs no guest) is a no, the probe guest's exit
	// code a yes.
	dir := t.TempDir()
	fake := func(name string, status int) string {
		path := filepath.Join(dir, name)
		os.WriteFile(path, []byte("#!/bin/sh\nexit "+strconv.Itoa(status)+"\n"), 0o755)
		return path
	}
	if p := probeKVM(ctx, kvmDevice, fake("failing-qemu", 1), true); p.OK || !strings.Contains(p.Found, "runs no ordinary guest") {
		t.Errorf("failing guest: %+v", p)
	}
	if p := probeKVM(ctx, kvmDevice, fake("booting-qemu", 0x31<<1|1), true); !p.OK {
		t.Errorf("booting guest: %+v", p)
	}
}

func TestTryCgroupsNegative(t *testing.T) {
	dir := t.TempDir()
	files := map[string][]string{dir: {"cpu.max", "memory.max"}}
	// A directory that is no cgroup hierarchy: the cgroup made in it has no
	// limit files. The probe's directory is removed either way.
	if err := tryCgroups(files, "probe"); err == nil || !strings.Contains(err.Error(), "set cpu.max") {
		t.Errorf("not a cgroup hierarchy: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "probe")); !os.IsNotExist(err) {
		t.Errorf("probe cgroup left: %v", err)
	}
	if err := tryCgroups(map[string][]string{dir: {"cpu.max"}}, "probe"); err == nil || !strings.Contains(err.Error(), "no memory controller") {
		t.Errorf("no memory controller: %v", err)
	}
	if err := tryCgroups(map[string][]string{filepath.Join(dir, "missing"): {"cpu.max", "memory.max"}}, "probe"); err == nil {
		t.Error("a missing hierarchy passed")
	}
}

// On this host, as root: the probe makes and removes a real cgroup.
func TestProbeCgroupsHere(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("making cgroups needs root")
	}
	p := probeCgroups()
	t.Logf("%+v", p)
	if !p.OK && !strings.Contains(p.Found, "cgroup") {
		t.Errorf("%+v", p)
	}
}

func TestProbeVsock(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	if p := probeVsock(ctx, filepath.Join(dir, "vms", "i-x", "v.sock")); !p.OK {
		t.Errorf("%+v", p)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("the probe left %v", left)
	}
	long := filepath.Join(dir, strings.Repeat("d", 100), "v.sock")
	if p := probeVsock(ctx, long); p.OK || !strings.Contains(p.Found, "more than the 107") {
		t.Errorf("too long: %+v", p)
	}
	if p := probeVsock(ctx, "/proc/self/v.sock"); p.OK || !strings.Contains(p.Found, "cannot") {
		t.Errorf("unwritable directory: %+v", p)
	}
	// The jailer's base decides the jailed sockets' length.
	deep := Paths{UseJailer: true, JailerBase: "/" + strings.Repeat("j", 80), Firecracker: "firecracker", RunDir: "/run/x"}
	if p := probeVsock(ctx, vsockSocketPath(deep)); p.OK || !strings.Contains(p.Found, "JAILER_BASE_DIRECTORY") {
		t.Errorf("deep jailer base: %+v", p)
	}
}

func TestProbeTools(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	failing := filepath.Join(dir, "failing")
	os.WriteFile(failing, []byte("#!/bin/sh\nexit 1\n"), 0o755)
	working := filepath.Join(dir, "working")
	os.WriteFile(working, []byte("#!/bin/sh\nexit 0\n"), 0o755)
	if p := probeTools(ctx, []diskTool{{working, "--version", "pkg", "x"}, {"/bin/sh", "", "pkg", "x"}}); !p.OK {
		t.Errorf("%+v", p)
	}
	p := probeTools(ctx, []diskTool{
		{working, "--version", "pkg", "fine"},
		{failing, "--version", "broken-pkg", "volumes cannot be made"},
		{filepath.Join(dir, "missing"), "", "missing-pkg", "instances cannot start"},
	})
	if p.OK || !strings.Contains(p.Found, "Debian: broken-pkg") || !strings.Contains(p.Found, "volumes cannot be made") ||
		!strings.Contains(p.Found, "Debian: missing-pkg") || strings.Contains(p.Found, "fine") {
		t.Errorf("%+v", p)
	}
}

func TestProbeFirmware(t *testing.T) {
	dir := t.TempDir()
	code, vars := filepath.Join(dir, "CODE.fd"), filepath.Join(dir, "VARS.fd")
	os.WriteFile(code, make([]byte, 4*flashBlock), 0o644)
	os.WriteFile(vars, make([]byte, 2*flashBlock), 0o644)
	data := filepath.Join(dir, "data")
	os.Mkdir(data, 0o755)
	if p := ProbeFirmware(code, vars, data); !p.OK {
		t.Errorf("%+v", p)
	}
	if left, _ := os.ReadDir(data); len(left) != 0 {
		t.Errorf("the probe left %v", left)
	}
	truncated := filepath.Join(dir, "truncated.fd")
	os.WriteFile(truncated, make([]byte, flashBlock+100), 0o644)
	for name, tc := range map[string]struct{ code, vars, want string }{
		"unset":            {"", vars, "is empty"},
		"no firmware":      {filepath.Join(dir, "missing.fd"), vars, "apt-get install ovmf"},
		"no variables":     {code, filepath.Join(dir, "missing.fd"), "apt-get install ovmf"},
		"truncated":        {truncated, vars, "not a flash image"},
		"empty":            {"/dev/null", vars, "not a flash image"},
		"a directory":      {dir, vars, "not a flash image"},
		"unreadable store": {code, "/proc/self/mem", "not a flash image"},
	} {
		if p := ProbeFirmware(tc.code, tc.vars, data); p.OK || !strings.Contains(p.Found, tc.want) {
			t.Errorf("%s: %+v", name, p)
		}
	}
	if p := ProbeFirmware(code, vars, "/proc/self"); p.OK || !strings.Contains(p.Found, "cannot copy") {
		t.Errorf("unwritable data directory: %+v", p)
	}
}
