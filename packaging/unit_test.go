package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
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
