// Package testenv finds what tests need from outside the repository and
// skips, with the reason, the tests that cannot run here.
package testenv

import (
	"os"
	"path/filepath"
	"testing"
)

// SharedDir returns the project's shared/ directory: $ALEPHVM_SHARED, or
// the first ../shared found walking up from the test's directory. The test
// is skipped when there is none.
func SharedDir(t testing.TB) string {
	t.Helper()
	dir, ok := FindSharedDir()
	if !ok {
		t.Skip("no shared/ directory beside the checkout (set ALEPHVM_SHARED): reference fixtures unavailable")
	}
	return dir
}

// FindSharedDir looks for the shared/ directory as SharedDir does.
func FindSharedDir() (string, bool) {
	if dir := os.Getenv("ALEPHVM_SHARED"); dir != "" {
		return dir, true
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", false
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		candidate := filepath.Join(dir, "..", "shared")
		if st, err := os.Stat(filepath.Join(candidate, "fixtures")); err == nil && st.IsDir() {
			return filepath.Clean(candidate), true
		}
		if filepath.Dir(dir) == dir {
			return "", false
		}
	}
}
