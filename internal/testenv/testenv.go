// Package testenv finds what tests need from outside the repository and
// skips, with the reason, the tests that cannot run here.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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

// isolatedEnv marks a test binary re-executed in a network namespace of its
// own.
const isolatedEnv = "ALEPHVM_TEST_NETNS"

// RunIsolated runs the package's tests. As root it first re-executes the
// test binary in a new network namespace that holds only a loopback
// interface, so that every tap, bridge, nftables rule and VM the tests make
// lives there and no packet can leave the machine. Call it from TestMain:
//
//	func TestMain(m *testing.M) { testenv.RunIsolated(m) }
func RunIsolated(m *testing.M) {
	if os.Geteuid() != 0 || os.Getenv(isolatedEnv) != "" {
		if os.Getenv(isolatedEnv) != "" {
			if err := exec.Command("ip", "link", "set", "lo", "up").Run(); err != nil {
				fmt.Fprintln(os.Stderr, "testenv: bring up lo in the test namespace:", err)
				os.Exit(1)
			}
		}
		os.Exit(m.Run())
	}
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	cmd.Env = append(os.Environ(), isolatedEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		os.Exit(0)
	case errors.As(err, &exit):
		os.Exit(exit.ExitCode())
	default:
		fmt.Fprintln(os.Stderr, "testenv: re-run the tests in a new network namespace:", err)
		os.Exit(1)
	}
}

// Isolated reports whether the tests run in their own network namespace.
func Isolated() bool { return os.Getenv(isolatedEnv) != "" }

// RequireIsolatedRoot skips a test that needs root in its own network
// namespace (see RunIsolated) when it does not have them.
func RequireIsolatedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (it makes network devices or boots VMs)")
	}
	if !Isolated() {
		t.Skip("needs its own network namespace: call testenv.RunIsolated from TestMain")
	}
}

// RequireTools skips a test when one of the named programs is not on PATH.
func RequireTools(t testing.TB, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			t.Skipf("needs %s, which is not installed (see scripts/test.sh)", name)
		}
	}
}

// CacheDir returns a directory for assets that tests build once and reuse
// across runs: $ALEPHVM_TEST_CACHE, else /var/tmp/alephvm-test-cache.
func CacheDir(t testing.TB) string {
	t.Helper()
	dir := CachePath()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("test cache: %v", err)
	}
	return dir
}

// ReachableTempDir returns a new directory in the test cache that every
// user can reach (0755, unlike t.TempDir's 0700 parents), removed when the
// test ends: for builds whose tools drop privileges, such as apt's _apt.
func ReachableTempDir(t testing.TB, pattern string) string {
	t.Helper()
	dir, err := os.MkdirTemp(CacheDir(t), pattern)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Golden compares got with the golden file path, failing the test where
// they differ. With UPDATE_GOLDEN=1 in the environment it rewrites the file
// instead.
func Golden(t testing.TB, path string, got []byte) {
	t.Helper()
	if os.Getenv("UPDATE_GOLDEN") != "" {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (UPDATE_GOLDEN=1 creates it)", err)
	}
	if string(want) != string(got) {
		t.Errorf("differs from %s (UPDATE_GOLDEN=1 rewrites it if the change is intended):\n%s", path, got)
	}
}

// CachePath is the directory CacheDir returns, for code that runs outside
// a test (TestMain).
func CachePath() string {
	if dir := os.Getenv("ALEPHVM_TEST_CACHE"); dir != "" {
		return dir
	}
	return "/var/tmp/alephvm-test-cache"
}

// PackageCache is where tests that build Debian roots keep the .deb files
// they download, for the next build (assets.Options.PackageCache): in the
// test cache.
func PackageCache() string {
	return filepath.Join(CachePath(), "debs")
}

// OpenFiles returns the regular files process pid has open, by path.
func OpenFiles(t testing.TB, pid int) []string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(dir, fd.Name()))
		if err != nil || !strings.HasPrefix(target, "/") {
			continue // closed meanwhile, or a socket, pipe or anonymous inode
		}
		if st, err := os.Stat(target); err == nil && st.Mode().IsRegular() {
			files = append(files, target)
		}
	}
	return files
}
