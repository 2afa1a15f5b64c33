package packaging

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/internal/testenv"
)

// The container's root: a Debian root made by mmdebstrap with systemd and
// every package the .deb depends on or recommends, so that installing it
// needs no network. It is built once per recipe into the test cache by
// TestMain (it needs the network, which the isolated tests do not have)
// and never changed: each test boots an overlay of it.
const (
	rootDirEnv = "ALEPHVM_TEST_DEB_ROOT"
	rootErrEnv = "ALEPHVM_TEST_DEB_ROOT_ERROR"
	// rootRecipeVersion changes when the way the root is made changes.
	rootRecipeVersion = "1"
)

// containerTools are what the package test drives on the host.
var containerTools = []string{"systemd-nspawn", "nsenter", "mmdebstrap", "dpkg-deb", "go"}

// prepareRoot builds the container's root into the test cache, or finds
// it there: as root, outside the isolated namespace, not in -short mode,
// where the tools are installed. The test reads the outcome with
// containerRoot.
func prepareRoot() {
	if os.Geteuid() != 0 || testenv.Isolated() || testing.Short() || os.Getenv(rootDirEnv) != "" {
		return
	}
	for _, tool := range containerTools {
		if _, err := exec.LookPath(tool); err != nil {
			return // the test skips, naming the tool
		}
	}
	dir, err := buildRoot(context.Background())
	if err != nil {
		os.Setenv(rootErrEnv, err.Error())
		return
	}
	os.Setenv(rootDirEnv, dir)
}

// containerRoot returns the root prepareRoot built, failing the test if
// the build failed.
func containerRoot(t *testing.T) string {
	t.Helper()
	if msg := os.Getenv(rootErrEnv); msg != "" {
		t.Fatalf("building the container's root: %s", msg)
	}
	dir := os.Getenv(rootDirEnv)
	if dir == "" {
		t.Fatal("no container root (TestMain must call prepareRoot)")
	}
	return dir
}

// rootPackages lists what the root holds: systemd, to boot, and the
// first choice of every Depends and Recommends of the package.
func rootPackages(control []byte) ([]string, error) {
	pkgs := []string{"systemd", "systemd-sysv", "dbus"}
	found := false
	for _, line := range strings.Split(string(control), "\n") {
		field, value, ok := strings.Cut(line, ":")
		if !ok || (field != "Depends" && field != "Recommends") {
			continue
		}
		found = true
		for _, dep := range strings.Split(value, ",") {
			name := strings.Fields(strings.Split(dep, "|")[0])
			if len(name) == 0 {
				return nil, fmt.Errorf("control: empty dependency in %q", line)
			}
			name[0], _, _ = strings.Cut(name[0], ":") // an architecture qualifier
			pkgs = append(pkgs, name[0])
		}
	}
	if !found {
		return nil, errors.New("control: no Depends or Recommends")
	}
	slices.Sort(pkgs)
	return slices.Compact(pkgs), nil
}

// buildRoot makes the root with mmdebstrap from this machine's apt
// sources (no mirror is named: mmdebstrap uses the machine's), keyed by
// the recipe, and removes roots of older recipes.
func buildRoot(ctx context.Context) (string, error) {
	key, suite, pkgs, err := rootRecipe()
	if err != nil {
		return "", err
	}
	parent := filepath.Join(testenv.CachePath(), "deb-root")
	dir := filepath.Join(parent, key)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(parent, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(dir, "etc", "os-release")); err == nil {
		return dir, nil
	}
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	started := time.Now()
	cmd := exec.CommandContext(ctx, "mmdebstrap", "--variant=minbase", "--include="+strings.Join(pkgs, ","), suite, tmp)
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(tmp)
		return "", fmt.Errorf("mmdebstrap: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	fmt.Fprintf(os.Stderr, "packaging: built the container root %s in %s\n", dir, time.Since(started).Round(time.Second))
	old, _ := os.ReadDir(parent)
	for _, e := range old {
		if e.IsDir() && e.Name() != key {
			os.RemoveAll(filepath.Join(parent, e.Name()))
		}
	}
	return dir, nil
}

// rootRecipe returns what the root is made of, and its key: the suite,
// the packages and this machine's apt sources.
func rootRecipe() (key, suite string, pkgs []string, err error) {
	control, err := os.ReadFile(filepath.Join("deb", "control"))
	if err != nil {
		return "", "", nil, err
	}
	if pkgs, err = rootPackages(control); err != nil {
		return "", "", nil, err
	}
	suite = hostSuite()
	h := sha256.New()
	fmt.Fprintf(h, "deb-root %s\n%s\n%s\n", rootRecipeVersion, suite, strings.Join(pkgs, ","))
	sources, _ := filepath.Glob("/etc/apt/sources.list.d/*")
	for _, f := range append([]string{"/etc/apt/sources.list"}, sources...) {
		data, _ := os.ReadFile(f)
		fmt.Fprintf(h, "%s\n%s\n", f, data)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], suite, pkgs, nil
}

// hostSuite is this machine's Debian suite: the package targets it.
func hostSuite() string {
	data, _ := os.ReadFile("/etc/os-release")
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VERSION_CODENAME="); ok && v != "" {
			return strings.Trim(v, `"`)
		}
	}
	return "bookworm"
}

// container is a throwaway Debian system booted with systemd by
// systemd-nspawn: an overlay over the cached root (every change goes to a
// directory removed at the end), a network namespace of its own with only
// a loopback interface, and its own PID namespace, so that everything it
// starts, VMs included, ends with it.
type container struct {
	root   string // the merged root, as this process sees it
	leader int    // the container's PID 1 (its systemd), in our PID namespace
	netns  *os.File
	log    *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// bootContainer boots lower (read only) with systemd. prepare writes into
// the root before it boots; binds are host directories shown read only at
// the same path inside. Everything is undone when the test ends.
func bootContainer(t *testing.T, lower string, binds []string, prepare func(root string)) *container {
	t.Helper()
	// On disk, not in a tmpfs: the VMs' disks and the store go there.
	scratch, err := os.MkdirTemp("/var/tmp", "alephvm-pkgtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(scratch); err != nil {
			t.Errorf("remove the container's changes: %v", err)
		}
	})
	upper, work, merged := filepath.Join(scratch, "upper"), filepath.Join(scratch, "work"), filepath.Join(scratch, "root")
	for _, d := range []string{upper, work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Fatalf("mount the container's root: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, 0); err != nil {
			t.Errorf("unmount the container's root: %v", err)
			_ = unix.Unmount(merged, unix.MNT_DETACH)
		}
	})
	prepare(merged)

	c := &container{root: merged, log: &lockedBuffer{}}
	machine := fmt.Sprintf("avmpkg%d", os.Getpid())
	// --register=no and --keep-unit: no host systemd is asked for anything
	// (this machine may have none); --private-network: only lo inside.
	args := []string{"--quiet", "--directory", merged, "--machine", machine, "--register=no", "--keep-unit",
		"--private-network", "--boot"}
	for _, b := range binds {
		args = append(args, "--bind-ro="+b)
	}
	nspawn := exec.Command("systemd-nspawn", args...)
	nspawn.Stdout, nspawn.Stderr = c.log, c.log
	if err := nspawn.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = nspawn.Wait(); close(exited) }()
	t.Cleanup(func() {
		// SIGTERM makes nspawn shut the container down; its PID namespace
		// ends with it, and every process in it (VMs too).
		_ = nspawn.Process.Signal(unix.SIGTERM)
		select {
		case <-exited:
		case <-time.After(90 * time.Second):
			t.Errorf("the container did not stop in 90 s: killed\n%s", tail(c.log.String(), 40))
			_ = nspawn.Process.Kill()
			<-exited
		}
		if c.netns != nil {
			c.netns.Close()
		}
		if c.leader != 0 {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", c.leader)); err == nil {
				t.Errorf("the container's init %d outlived it", c.leader)
			}
		}
		os.Remove(filepath.Join("/run/systemd/nspawn/propagate", machine))
	})

	deadline := time.Now().Add(time.Minute)
	for c.leader == 0 {
		select {
		case <-exited:
			t.Fatalf("systemd-nspawn exited:\n%s", c.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no init in the container after a minute:\n%s", c.log.String())
		}
		c.leader = childNamed(nspawn.Process.Pid, "systemd")
		time.Sleep(100 * time.Millisecond)
	}
	if c.netns, err = os.Open(fmt.Sprintf("/proc/%d/ns/net", c.leader)); err != nil {
		t.Fatal(err)
	}
	// Until its bus is up, systemctl cannot ask, and until systemd has
	// made /run/systemd/system it says "offline" (seen in CI: asked in the
	// first instants of the container's init); "degraded" (a unit failed)
	// is no reason to stop, it is shown.
	state := ""
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		out, _ := c.runTimeout(2*time.Minute, nil, "systemctl", "is-system-running", "--wait")
		state = strings.TrimSpace(out)
		starting := strings.Contains(state, "Failed to connect to bus") || state == "offline"
		if !starting || time.Now().After(deadline) {
			break
		}
	}
	if state != "running" {
		failed, _ := c.run(nil, "systemctl", "--failed", "--no-pager")
		if state != "degraded" {
			t.Fatalf("the container's systemd is %q:\n%s\n%s", state, failed, tail(c.log.String(), 40))
		}
		t.Logf("the container's systemd is degraded:\n%s", failed)
	}
	return c
}

// childNamed returns the pid of the child of parent whose command is
// name, or 0.
func childNamed(parent int, name string) int {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		comm, ppid, ok := parseStat(string(data), 4)
		if ok && ppid == strconv.Itoa(parent) && comm == name {
			return pid
		}
	}
	return 0
}

// parseStat returns a process's command and its field number field of
// /proc/PID/stat (1-based, as proc(5) counts), past the command, which may
// hold spaces and parentheses.
func parseStat(stat string, field int) (comm, value string, ok bool) {
	open, closing := strings.IndexByte(stat, '('), strings.LastIndexByte(stat, ')')
	if open < 0 || closing < open {
		return "", "", false
	}
	rest := strings.Fields(stat[closing+1:]) // field 3 onwards
	if field < 3 || field-3 >= len(rest) {
		return "", "", false
	}
	return stat[open+1 : closing], rest[field-3], true
}

// run runs a command inside the container (all its namespaces), with a
// clean environment plus env, and returns its combined output.
func (c *container) run(env []string, args ...string) (string, error) {
	return c.runTimeout(5*time.Minute, env, args...)
}

func (c *container) runTimeout(timeout time.Duration, env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	full := []string{"--target", strconv.Itoa(c.leader), "--all", "--", "env", "-i",
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
		"DEBIAN_FRONTEND=noninteractive"}
	full = append(append(full, env...), args...)
	out, err := exec.CommandContext(ctx, "nsenter", full...).CombinedOutput()
	if err != nil {
		err = fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	return string(out), err
}

// stdout runs a command inside the container as run does and returns
// its standard output alone, failing the test if it fails.
func (c *container) stdout(t *testing.T, env []string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	full := append([]string{"--target", strconv.Itoa(c.leader), "--all", "--", "env", "-i",
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"}, env...)
	cmd := exec.CommandContext(ctx, "nsenter", append(full, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// must runs a command inside the container and fails the test if it fails.
func (c *container) must(t *testing.T, env []string, args ...string) string {
	t.Helper()
	out, err := c.run(env, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// dial opens a connection from inside the container's network namespace:
// a thread of ours enters it to create the socket, which stays there.
func (c *container) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the thread, now in the container's namespace,
		// ends with this goroutine instead of running other ones.
		runtime.LockOSThread()
		if err := unix.Setns(int(c.netns.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{err: fmt.Errorf("enter the container's network: %w", err)}
			return
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, addr)
		done <- result{conn, err}
	}()
	r := <-done
	return r.conn, r.err
}

// sshBanner connects to addr (an sshd) and reads its banner line,
// returning the connection still open.
func (c *container) sshBanner(addr string) (net.Conn, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := c.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, "", err
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	conn.SetReadDeadline(time.Time{})
	if err != nil || !strings.HasPrefix(line, "SSH-2.0-") {
		conn.Close()
		return nil, "", fmt.Errorf("banner %q: %v", line, err)
	}
	return conn, strings.TrimSpace(line), nil
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
