package packaging

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

func TestMain(m *testing.M) {
	flag.Parse()
	testassets.Prepare(false)
	prepareRoot()
	testenv.RunIsolated(m)
}

// The two versions the test builds: N, then the upgrade N+1.
const (
	versionN     = "1.0~pkgtest1"
	versionNext  = "1.0~pkgtest2"
	debDir       = "/root/debs"
	testToken    = "test"
	nodeURL      = "http://127.0.0.1:4020"
	nodeLogMatch = `msg="instance found running"`
)

// TestDebianPackage installs the package in a throwaway container booted
// with systemd, so that its unit really runs: version N is installed and
// its node started; an instance is started and answers; version N+1 is
// installed over it, and the instance must never stop (same QEMU process,
// a TCP connection into it still open) and be taken back by the new node;
// then the package is removed (the instance runs on, data and config
// kept), installed again (the instance taken back again) and purged
// (config gone, data kept). The host is left as it was: the container's
// changes live in an overlay removed at the end, its network is its own.
func TestDebianPackage(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a container and a Debian VM under emulation: minutes")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, containerTools...)
	lower := containerRoot(t)
	base := testassets.BaseImage(t)
	started := time.Now()
	phase := func(name string) {
		t.Logf("%-40s at %s", name, time.Since(started).Round(time.Second))
	}

	debs := t.TempDir()
	debN := buildDeb(t, versionN, debs)
	phase("built version N")

	baseDir := filepath.Dir(base.Ext4)
	sum := sha256.Sum256([]byte(testToken))
	// The service's own settings, as an operator would give them: no uplink
	// and no KVM in the container.
	serviceEnv := fmt.Sprintf("ALEPH_VM_QEMU_ACCEL=tcg\nALEPH_VM_NETWORK_INTERFACE=lo\nALEPH_VM_DNS_NAMESERVERS=10.0.0.53\nALEPH_VM_ALLOCATION_TOKEN_HASH=%s\n",
		hex.EncodeToString(sum[:]))
	c := bootContainer(t, lower, []string{baseDir}, func(root string) {
		// First a setting the node refuses: the installation must go
		// through all the same.
		writeFile(t, filepath.Join(root, "etc/default/alephvm"), serviceEnv+"ALEPH_VM_SUPERVISOR_PORT=http\n")
		// The node finds the base image the tests built where "alephvm
		// base-image build" would have put it.
		if err := os.MkdirAll(filepath.Join(root, "var/cache/alephvm"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(baseDir, filepath.Join(root, "var/cache/alephvm/base-image")); err != nil {
			t.Fatal(err)
		}
		copyFile(t, debN, filepath.Join(root, debDir, filepath.Base(debN)))
	})
	phase("container booted")
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: c.dial}}

	// Version N.
	out := c.must(t, nil, "apt-get", "install", "-y", filepath.Join(debDir, filepath.Base(debN)))
	for _, want := range []string{"alephvm doctor", "This host:", "qemu           ok", "base image      ok", `"alephvm assets build"`,
		"/etc/alephvm/config.yaml", "the node did not start: journalctl -u alephvm.service says why"} {
		if !strings.Contains(out, want) {
			t.Errorf("the installation does not say %q:\n%s", want, out)
		}
	}
	if journal, _ := c.run(nil, "journalctl", "-u", "alephvm", "--no-pager", "-o", "cat"); !strings.Contains(journal, "ALEPH_VM_SUPERVISOR_PORT") {
		t.Errorf("the journal does not say why the node did not start:\n%s", tail(journal, 20))
	}
	writeFile(t, filepath.Join(c.root, "etc/default/alephvm"), serviceEnv)
	c.must(t, nil, "systemctl", "restart", "alephvm")
	checkNode(t, c, client, versionN)
	if got := c.must(t, nil, "systemctl", "is-enabled", "alephvm"); strings.TrimSpace(got) != "enabled" {
		t.Errorf("the unit is %q after the installation", got)
	}
	if example := c.stdout(t, nil, "alephvm", "config", "example"); readFile(t, filepath.Join(c.root, "etc/alephvm/config.yaml")) != example {
		t.Error("/etc/alephvm/config.yaml is not what alephvm config example prints")
	}
	for _, installed := range []string{"usr/lib/alephvm/alephvm-init", "etc/logrotate.d/alephvm", "usr/share/doc/alephvm/packaging.md"} {
		if _, err := os.Stat(filepath.Join(c.root, installed)); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}
	phase("version N installed, node up")

	tokenEnv := []string{"ALEPH_VM_ALLOCATION_TOKEN=" + testToken}
	ref := strings.TrimSpace(c.stdout(t, nil, "alephvm", "instance", "create", "--image", "debian-12-ext4", "--size", "2048", "--memory", "512"))
	c.must(t, tokenEnv, "alephvm", "vm", "start", ref)
	ip := runningIP(t, client, ref)
	qemu := qemuProcess(t, c, ref)
	phase("instance started")

	// N+1 is built while the guest boots.
	built := make(chan error, 1)
	var debNext string
	go func() {
		var err error
		debNext, err = buildDebErr(versionNext, debs)
		built <- err
	}()
	// The guest is up once cloud-init has finished. Its config stage
	// restarted sshd (set-passwords wrote PasswordAuthentication) until
	// the base image came with that line already written; a connection
	// made during the restart was refused, and the checks after the
	// upgrade raced it. Waiting for cloud-init keeps this test off any
	// image's first-boot changes.
	consolePath := filepath.Join(c.root, "var/lib/alephvm/vms", "i-"+ref[:16], "console.log")
	deadline := time.Now().Add(10 * time.Minute)
	for {
		console, _ := os.ReadFile(consolePath)
		if cloudInitFinished(string(console)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cloud-init did not finish in the instance:\n%s", tail(string(console), 30))
		}
		time.Sleep(2 * time.Second)
	}
	var held net.Conn
	for held == nil {
		conn, banner, err := c.sshBanner(net.JoinHostPort(ip, "22"))
		if err == nil {
			held = conn
			t.Logf("the instance answers: %s", banner)
			break
		}
		if time.Now().After(deadline) {
			console, _ := os.ReadFile(consolePath)
			t.Fatalf("the instance's sshd does not answer: %v\n%s", err, tail(string(console), 30))
		}
		time.Sleep(2 * time.Second)
	}
	defer held.Close()
	phase("instance answers")
	if err := <-built; err != nil {
		t.Fatal(err)
	}
	copyFile(t, debNext, filepath.Join(c.root, debDir, filepath.Base(debNext)))
	phase("built version N+1")

	// The upgrade: the node restarts, the instance never stops.
	nodePID := mainPID(t, c)
	upgradeStart := time.Now()
	out = c.must(t, nil, "apt-get", "install", "-y", filepath.Join(debDir, filepath.Base(debNext)))
	t.Logf("apt-get install of N+1 took %s", time.Since(upgradeStart).Round(100*time.Millisecond))
	checkNode(t, c, client, versionNext)
	if pid := mainPID(t, c); pid == nodePID {
		t.Errorf("the node (pid %s) was not restarted by the upgrade", pid)
	}
	if got := qemuProcess(t, c, ref); got != qemu {
		t.Errorf("the instance's QEMU changed across the upgrade: %s, then %s", qemu, got)
	}
	if got := runningIP(t, client, ref); got != ip {
		t.Errorf("the instance's address changed across the upgrade: %s, then %s", ip, got)
	}
	// The connection opened before the upgrade still carries the SSH
	// handshake: the guest, its tap and the node's rules never went away.
	if _, err := fmt.Fprint(held, "SSH-2.0-alephvm-pkgtest\r\n"); err != nil {
		t.Errorf("write to the connection opened before the upgrade: %v", err)
	}
	held.SetReadDeadline(time.Now().Add(15 * time.Second))
	if n, err := io.ReadAtLeast(held, make([]byte, 64), 16); err != nil {
		t.Errorf("the connection opened before the upgrade is dead: %d bytes, %v", n, err)
	}
	if conn, _, err := c.sshBanner(net.JoinHostPort(ip, "22")); err != nil {
		t.Errorf("the instance does not answer after the upgrade: %v", err)
	} else {
		conn.Close()
	}
	checkAdopted(t, c, ref, 1)
	phase("upgraded to N+1, instance kept")

	// Removal stops the node, not the instance; config and data stay.
	out = c.must(t, nil, "apt-get", "remove", "-y", "alephvm")
	if !strings.Contains(out, "keep running") {
		t.Errorf("removal does not say the instances keep running:\n%s", out)
	}
	if state, _ := c.run(nil, "systemctl", "is-active", "alephvm"); strings.TrimSpace(state) != "inactive" {
		t.Errorf("the node is %q after removal", state)
	}
	for _, gone := range []string{"usr/bin/alephvm", "usr/lib/alephvm/alephvm-init", "lib/systemd/system/alephvm.service"} {
		if _, err := os.Stat(filepath.Join(c.root, gone)); err == nil {
			t.Errorf("/%s is still there after removal", gone)
		}
	}
	for _, kept := range []string{"etc/alephvm/config.yaml", "etc/logrotate.d/alephvm", "var/lib/alephvm/alephvm.sqlite3", "var/lib/alephvm/volumes/" + ref} {
		if _, err := os.Stat(filepath.Join(c.root, kept)); err != nil {
			t.Errorf("removal did not keep /%s: %v", kept, err)
		}
	}
	if got := qemuProcess(t, c, ref); got != qemu {
		t.Errorf("removal stopped the instance: QEMU %s, then %s", qemu, got)
	}
	phase("removed, instance runs on")

	// Installing again takes the instance back.
	c.must(t, nil, "apt-get", "install", "-y", filepath.Join(debDir, filepath.Base(debNext)))
	checkNode(t, c, client, versionNext)
	if got := runningIP(t, client, ref); got != ip {
		t.Errorf("after reinstalling, the instance's address is %s, was %s", got, ip)
	}
	if got := qemuProcess(t, c, ref); got != qemu {
		t.Errorf("reinstalling restarted the instance: QEMU %s, then %s", qemu, got)
	}
	checkAdopted(t, c, ref, 2)
	phase("reinstalled, instance taken back")

	// Purge removes the config, never the VMs' data.
	out = c.must(t, nil, "apt-get", "purge", "-y", "alephvm")
	for _, gone := range []string{"etc/alephvm", "etc/logrotate.d/alephvm"} {
		if _, err := os.Stat(filepath.Join(c.root, gone)); !os.IsNotExist(err) {
			t.Errorf("/%s is still there after purge: %v", gone, err)
		}
	}
	if _, err := os.Stat(filepath.Join(c.root, "var/lib/alephvm/volumes", ref)); err != nil {
		t.Errorf("purge removed the instance's disks: %v", err)
	}
	if !strings.Contains(out, "/var/lib/alephvm") {
		t.Errorf("purge does not say where the data stays:\n%s", out)
	}
	if status, _ := c.run(nil, "dpkg-query", "-W", "-f=${Status}", "alephvm"); strings.Contains(status, "installed") {
		t.Errorf("after purge the package is %q", status)
	}
	phase("purged")
	t.Logf("package test: %s (without the container root and base image, built once)", time.Since(started).Round(time.Second))
}

// checkNode waits for the unit to be active and the API to answer as the
// given version.
func checkNode(t *testing.T, c *container, client *http.Client, version string) {
	t.Helper()
	if state, err := c.run(nil, "systemctl", "is-active", "alephvm"); strings.TrimSpace(state) != "active" {
		journal, _ := c.run(nil, "journalctl", "-u", "alephvm", "--no-pager", "-n", "40")
		t.Fatalf("the node is %q (%v):\n%s", strings.TrimSpace(state), err, journal)
	}
	// Type=notify: active means listening.
	resp, err := client.Get(nodeURL + "/")
	if err != nil {
		t.Fatalf("the node's API: %v", err)
	}
	resp.Body.Close()
	if got := resp.Header.Get("Server"); got != "aleph-vm/"+version {
		t.Errorf("the node serving is %q, want alephvm/%s", got, version)
	}
}

// runningIP returns the address of the instance, which the node's API
// must list as running.
func runningIP(t *testing.T, client *http.Client, ref string) string {
	t.Helper()
	resp, err := client.Get(nodeURL + "/v2/about/executions/list")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list map[string]struct {
		Networking struct {
			IPv4 string `json:"ipv4_ip"`
		} `json:"networking"`
		Running bool `json:"running"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	vm, ok := list[ref]
	if !ok || !vm.Running || vm.Networking.IPv4 == "" {
		t.Fatalf("the node does not list %s as running: %+v", ref, list)
	}
	return vm.Networking.IPv4
}

// qemuProcess names the instance's QEMU process by its pid and start time,
// so that a new process under a reused pid differs.
func qemuProcess(t *testing.T, c *container, ref string) string {
	t.Helper()
	pid := strings.TrimSpace(readFile(t, filepath.Join(c.root, "var/lib/alephvm/vms", "i-"+ref[:16], "qemu.pid")))
	stat, err := c.run(nil, "cat", "/proc/"+pid+"/stat")
	if err != nil {
		t.Fatalf("the instance's QEMU %s is gone: %v", pid, err)
	}
	comm, start, ok := parseStat(stat, 22)
	if !ok || !strings.HasPrefix(comm, "qemu-system") {
		t.Fatalf("process %s is not a QEMU: %q", pid, stat)
	}
	return pid + " started at tick " + start
}

func mainPID(t *testing.T, c *container) string {
	t.Helper()
	return strings.TrimSpace(c.must(t, nil, "systemctl", "show", "--property=MainPID", "--value", "alephvm"))
}

// checkAdopted makes sure the node took the instance back as it ran, times
// times in all, and never started it again.
func checkAdopted(t *testing.T, c *container, ref string, times int) {
	t.Helper()
	journal := c.must(t, nil, "journalctl", "-u", "alephvm", "--no-pager", "-o", "cat")
	if got := strings.Count(journal, nodeLogMatch+" ref="+ref); got != times {
		t.Errorf("the node took the instance back %d times, want %d:\n%s", got, times, tail(journal, 30))
	}
	if strings.Contains(journal, "instance not running any more") {
		t.Errorf("the node found the instance stopped and started it again:\n%s", tail(journal, 30))
	}
}

// buildDeb builds the package of this checkout as version into dir with
// scripts/build-deb.sh.
func buildDeb(t *testing.T, version, dir string) string {
	t.Helper()
	deb, err := buildDebErr(version, dir)
	if err != nil {
		t.Fatal(err)
	}
	return deb
}

func buildDebErr(version, dir string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "../scripts/build-deb.sh", "-v", version, "-o", dir)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("build-deb.sh -v %s: %v\n%s", version, err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, string(data))
}

// cloudInitFinished reports whether a guest's console shows cloud-init's
// final message ("Cloud-init v. 22.4.2 finished at ...").
func cloudInitFinished(console string) bool {
	for line := range strings.Lines(console) {
		if strings.Contains(line, "Cloud-init v. ") && strings.Contains(line, " finished at ") {
			return true
		}
	}
	return false
}
