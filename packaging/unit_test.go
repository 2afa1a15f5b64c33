package packaging

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func TestRootPackages(t *testing.T) {
	control := []byte("Package: x\nDepends: a (>= 1.0), b | c, d:any\nRecommends: e\nSuggests: f\nDescription: Depends: g\n")
	got, err := rootPackages(control)
	want := []string{"a", "b", "d", "dbus", "e", "systemd", "systemd-sysv"}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("%q %v, want %q", got, err, want)
	}
	for _, bad := range []string{"Package: x\n", "Depends: a, , b\n", "Depends: | a\n"} {
		if got, err := rootPackages([]byte(bad)); err == nil {
			t.Errorf("%q: accepted as %q", bad, got)
		}
	}
	// The real control file: the root has QEMU and what the node needs.
	control, err = os.ReadFile(filepath.Join("deb", "control"))
	if err != nil {
		t.Fatal(err)
	}
	got, err = rootPackages(control)
	if err != nil || !slices.Contains(got, "qemu-system-x86") || !slices.Contains(got, "qemu-utils") {
		t.Errorf("%q %v", got, err)
	}
}

func TestParseStat(t *testing.T) {
	stat := "139 (qemu-system-x86) R 1 139 139 0 -1 4194560 5 0 0 0 7 3 0 0 20 0 5 0 800807 2 3\n"
	if comm, v, ok := parseStat(stat, 22); !ok || comm != "qemu-system-x86" || v != "800807" {
		t.Errorf("%q %q %v", comm, v, ok)
	}
	if comm, v, ok := parseStat("7 (a) b) (c) S 42", 4); !ok || comm != "a) b) (c" || v != "42" {
		t.Errorf("a command with parentheses: %q %q %v", comm, v, ok)
	}
	for _, bad := range []string{"", "12 noparens S 1", "1 (x) S"} {
		if _, _, ok := parseStat(bad, 4); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}

// TestUnit keeps the properties the upgrade story rests on.
func TestUnit(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("deb", "alephvm.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := string(data)
	for _, want := range []string{
		"\nKillMode=process\n", "\nType=notify\n", "\nExecStart=/usr/bin/alephvm serve\n", "\nRestart=on-failure\n",
		"\nOOMPolicy=continue\n", "\nEnvironmentFile=-/etc/default/alephvm\n", "\nWantedBy=multi-user.target\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit lacks %q", strings.TrimSpace(want))
		}
	}
}

// TestMaintainerScripts checks the scripts' syntax with the shell dpkg
// runs them with, and that an upgrade never stops the node from prerm.
func TestMaintainerScripts(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("needs sh")
	}
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		path := filepath.Join("deb", script)
		if out, err := exec.Command("sh", "-n", path).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", script, err, out)
		}
		if st, err := os.Stat(path); err != nil || st.Mode()&0o111 == 0 {
			t.Errorf("%s is not executable: %v", script, err)
		}
	}
	prerm, _ := os.ReadFile(filepath.Join("deb", "prerm"))
	if !strings.Contains(string(prerm), `if [ "$1" = remove ]`) {
		t.Error("prerm must stop the node on removal only")
	}
}

// TestLogrotate runs logrotate with the package's rule over a VM
// directory whose qemu.log a QEMU-like writer holds open: the log is
// rotated past 1 MiB and the writer goes on at its start.
func TestLogrotate(t *testing.T) {
	testenv.RequireTools(t, "logrotate")
	data, err := os.ReadFile(filepath.Join("deb", "alephvm.logrotate"))
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	rule := strings.ReplaceAll(string(data), "/var/lib/alephvm", root)
	if rule == string(data) {
		t.Fatal("the rule does not name /var/lib/alephvm")
	}
	config := filepath.Join(root, "logrotate.conf")
	os.WriteFile(config, []byte(rule), 0o644)
	big, small := filepath.Join(root, "vms", "i-big", "qemu.log"), filepath.Join(root, "vms", "i-small", "qemu.log")
	for _, p := range []string{big, small} {
		os.MkdirAll(filepath.Dir(p), 0o755)
	}
	os.WriteFile(small, []byte("a warning\n"), 0o600)
	qemu, err := os.OpenFile(big, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer qemu.Close()
	qemu.Write(bytes.Repeat([]byte("warning: the guest did something odd\n"), 40000))

	if out, err := exec.Command("logrotate", "--state", filepath.Join(root, "state"), config).CombinedOutput(); err != nil {
		t.Fatalf("logrotate: %v\n%s", err, out)
	}
	if _, err := os.Stat(big + ".1.gz"); err != nil {
		t.Errorf("the big log was not rotated: %v", err)
	}
	qemu.WriteString("after rotation\n")
	if got, _ := os.ReadFile(big); string(got) != "after rotation\n" {
		t.Errorf("after rotation the log holds %d bytes, starting %q", len(got), got[:min(len(got), 20)])
	}
	if got, _ := os.ReadFile(small); string(got) != "a warning\n" {
		t.Errorf("the small log changed: %q", got)
	}
	if _, err := os.Stat(small + ".1.gz"); err == nil {
		t.Error("the small log was rotated")
	}
}
