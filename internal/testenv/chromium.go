package testenv

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// Chromium returns Debian's headless-capable chromium, or skips the test
// saying how to get it.
func Chromium(t testing.TB) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	t.Skip("no chromium: apt-get install chromium (scripts/test.sh installs it) to test the status page in a real browser")
	return ""
}

// chromiumArgs run a headless chromium that reaches loopback only: every
// other request goes to a proxy that does not exist (chromium never
// proxies loopback), and its background requests are off. Tests that run
// it as root run it in their own network namespace besides.
func chromiumArgs(t testing.TB, extra ...string) []string {
	args := []string{"--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + t.TempDir(),
		"--no-first-run", "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
		"--disable-sync", "--disable-default-apps", "--disable-extensions", "--no-pings", "--disable-domain-reliability",
		"--disable-breakpad", "--proxy-server=http://127.0.0.1:9", "--enable-logging=stderr", "--v=0",
		"--hide-scrollbars", "--force-device-scale-factor=1"}
	return append(args, extra...)
}

// runChromium runs chromium with args, bounded in time, and returns what
// it printed on stdout and stderr.
func runChromium(t testing.TB, args []string) (stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, Chromium(t), args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir())
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %v: %v\n%s", args, err, errOut.String())
	}
	return out.String(), errOut.String()
}

// HeadlessDOM loads url in headless chromium, lets its scripts run for
// budget of virtual time (timers fire, fetches complete), and returns the
// page's DOM then and chromium's log (console messages, CSP refusals).
func HeadlessDOM(t testing.TB, url string, budget time.Duration) (dom, log string) {
	t.Helper()
	return runChromium(t, chromiumArgs(t, "--virtual-time-budget="+strconv.FormatInt(budget.Milliseconds(), 10), "--dump-dom", url))
}

// Screenshot saves a PNG of url, width by height pixels, after budget of
// virtual time, to path.
func Screenshot(t testing.TB, url, path string, width, height int, budget time.Duration) {
	t.Helper()
	_, log := runChromium(t, chromiumArgs(t, "--window-size="+strconv.Itoa(width)+","+strconv.Itoa(height),
		"--virtual-time-budget="+strconv.FormatInt(budget.Milliseconds(), 10), "--screenshot="+path, url))
	if st, err := os.Stat(path); err != nil || st.Size() == 0 {
		t.Fatalf("no screenshot of %s at %s: %v\n%s", url, path, err, log)
	}
}

// Artifact returns where a test saves an artifact named name: in
// $ALEPHVM_TEST_ARTIFACTS when it is set (made if missing), else "" .
func Artifact(t testing.TB, name string) string {
	t.Helper()
	dir := os.Getenv("ALEPHVM_TEST_ARTIFACTS")
	if dir == "" {
		return ""
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("artifacts directory: %v", err)
	}
	return filepath.Join(dir, name)
}
