// Package diagnostic_test runs the diagnostic program's own tests (Python,
// standard library only) under the host's python3.
package diagnostic_test

import (
	"os/exec"
	"testing"
)

func TestDiagnosticProgram(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3: the diagnostic program's tests need it (apt-get install python3)")
	}
	out, err := exec.Command(python, "-m", "unittest", "discover", "-s", ".", "-v").CombinedOutput()
	if err != nil {
		t.Fatalf("the diagnostic program's tests failed: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}
