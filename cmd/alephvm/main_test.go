package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/internal/testenv"
)

func runCLI(t testing.TB, environ []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, &out, &errOut, environ)
	return code, out.String(), errOut.String()
}

func TestMessageValidate(t *testing.T) {
	fixtures := filepath.Join(testenv.SharedDir(t), "fixtures", "aleph-message")
	files, _ := filepath.Glob(filepath.Join(fixtures, "*.json"))
	if len(files) == 0 {
		t.Fatal("no fixtures")
	}

	code, out, _ := runCLI(t, nil, append([]string{"message", "validate", "--regenerate"}, files...)...)
	if code != 0 || strings.Count(out, ": ok ") != len(files) {
		t.Errorf("regenerate: exit %d\n%s", code, out)
	}

	// As received, only instance_content.json carries its item_hash.
	code, out, _ = runCLI(t, nil, append([]string{"message", "validate"}, files...)...)
	if code != 1 || strings.Count(out, ": ok ") != 1 || strings.Count(out, "\n") != len(files) {
		t.Errorf("as received: exit %d\n%s", code, out)
	}

	bad := filepath.Join(t.TempDir(), "bad.json")
	data, _ := os.ReadFile(filepath.Join(fixtures, "instance_machine.json"))
	os.WriteFile(bad, []byte(strings.Replace(string(data), `"vcpus": 1`, `"vcpus": 0`, 1)), 0o600)
	code, out, _ = runCLI(t, nil, "message", "validate", "--regenerate", bad, filepath.Join(t.TempDir(), "missing.json"))
	if code != 1 || !strings.Contains(out, "content.resources.vcpus: must be between 1 and 256, got 0") ||
		!strings.Contains(out, "missing.json: invalid: no such file or directory") {
		t.Errorf("exit %d\n%s", code, out)
	}

	if code, _, _ := runCLI(t, nil, "message", "validate"); code != 1 {
		t.Errorf("no file: exit %d", code)
	}
}

func TestConfigShow(t *testing.T) {
	code, out, errOut := runCLI(t, []string{"ALEPH_VM_DOMAIN_NAME=node.example"}, "config", "show", "--supervisor-port", "4999")
	if code != 0 || !strings.Contains(out, "ALEPH_VM_SUPERVISOR_PORT=4999") || !strings.Contains(out, "ALEPH_VM_DOMAIN_NAME=node.example") {
		t.Errorf("exit %d\n%s%s", code, out, errOut)
	}
	code, _, errOut = runCLI(t, []string{"ALEPH_VM_LOG_FORMAT=xml"}, "version")
	if code != 1 || !strings.Contains(errOut, "ALEPH_VM_LOG_FORMAT") {
		t.Errorf("bad setting: exit %d, %s", code, errOut)
	}
}

func TestConfigExample(t *testing.T) {
	// The example is the defaults: a broken setting in the environment or a
	// config file that does not exist change nothing.
	code, out, errOut := runCLI(t, []string{"ALEPH_VM_SUPERVISOR_PORT=http", "ALEPH_VM_CONFIG=/nonexistent.yaml"}, "config", "example")
	if code != 0 || out != config.Example() || errOut != "" {
		t.Errorf("exit %d\n%s%s", code, out, errOut)
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := runCLI(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "alephvm ") {
		t.Errorf("exit %d: %s", code, out)
	}
}
