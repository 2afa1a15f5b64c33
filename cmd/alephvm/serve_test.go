package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

func TestMain(m *testing.M) {
	maybeServe()
	testenv.MaybeRunHelper()
	flag.Parse()
	testassets.Prepare(true)
	testenv.RunIsolated(m)
}

func httpGet(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// operatorGet is httpGet with the operator's token (nodeEnv's "test").
func operatorGet(t testing.TB, url string) (int, string) { return operatorRequest(t, "GET", url) }

// operatorPost POSTs to url, without a body, with the operator's token.
func operatorPost(t testing.TB, url string) (int, string) { return operatorRequest(t, "POST", url) }

func operatorRequest(t testing.TB, method, url string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	req.Header.Set("X-Auth-Signature", "test")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// syncBuffer is a bytes.Buffer safe for the serving goroutine to write.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// nodeEnv returns a node's settings for a test: its directories, a free
// port, the token "test" (sent by the CLI and accepted by the node), the
// uplink and the guests' resolver.
func nodeEnv(t testing.TB, uplink, dns string) (dir string, port int, env []string) {
	dir = t.TempDir()
	sum := sha256.Sum256([]byte("test"))
	port = freePort(t)
	env = []string{
		"ALEPH_VM_EXECUTION_ROOT=" + filepath.Join(dir, "state"), "ALEPH_VM_CACHE_ROOT=" + filepath.Join(dir, "cache"),
		"ALEPH_VM_SUPERVISOR_PORT=" + strconv.Itoa(port), "ALEPH_VM_ALLOCATION_TOKEN_HASH=" + hex.EncodeToString(sum[:]),
		"ALEPH_VM_ALLOCATION_TOKEN=test", "ALEPH_VM_NETWORK_INTERFACE=" + uplink, "ALEPH_VM_DNS_NAMESERVERS=" + dns,
		"ALEPH_VM_QEMU_ACCEL=tcg",
		// Template VMs would boot beside the tests' own: only the snapshot
		// tests turn them on.
		"ALEPH_VM_PROGRAM_SNAPSHOTS=false",
	}
	return dir, port, env
}

// waitListening waits until the node listens on port, showing its logs
// if it does not.
func waitListening(t testing.TB, port int, logs func() string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node did not listen:\n%s", logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestServe runs the node and drives an instance through its API with the
// CLI: create, start, list, refused without the token, stop, erase; then
// the node shuts down on its context.
func TestServe(t *testing.T) {
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img", "nft", "mkfs.ext4")
	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	// systemd's Type=notify: the node says when it is ready and stopping.
	notifyPath := filepath.Join(dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	notified := func() string {
		buf := make([]byte, 4096)
		notify.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, _ := notify.Read(buf)
		return string(buf[:n])
	}
	ctx, cancel := context.WithCancel(context.Background())
	var serveErr syncBuffer
	served := make(chan int, 1)
	go func() {
		var out syncBuffer
		served <- run(ctx, []string{"serve"}, &out, &serveErr, append(slices.Clone(env), "NOTIFY_SOCKET="+notifyPath))
	}()
	waitListening(t, port, serveErr.String)
	if got := notified(); !strings.HasPrefix(got, "READY=1\n") {
		t.Errorf("systemd was told %q once the node listened", got)
	}

	base := filepath.Join(dir, "base.img")
	img := make([]byte, 16<<20)
	copy(img, []byte{0xfa, 0xf4, 0xeb, 0xfd}) // boot code: cli; hlt; jmp to hlt
	img[510], img[511] = 0x55, 0xaa
	os.WriteFile(base, img, 0o644)
	code, out, errOut := runCLI(t, env, "instance", "create", "--image", base, "--size", "64", "--memory", "128", "--publish", "80")
	if code != 0 {
		t.Fatalf("create: %s %s", out, errOut)
	}
	ref := strings.TrimSpace(out)
	withToken := env
	if code, _, errOut := runCLI(t, append(slices.Clone(env), "ALEPH_VM_ALLOCATION_TOKEN=wrong"), "vm", "start", ref); code == 0 || !strings.Contains(errOut, "401") {
		t.Errorf("start with a wrong token: %d %s", code, errOut)
	}
	if code, out, errOut := runCLI(t, withToken, "vm", "start", ref); code != 0 {
		t.Fatalf("start: %s %s\n%s", out, errOut, serveErr.String())
	}
	code, out, _ = runCLI(t, env, "vm", "list")
	if code != 0 || !strings.Contains(out, ref) || !strings.Contains(out, "running") || !strings.Contains(out, "24000->22") || !strings.Contains(out, "->80") {
		t.Errorf("list:\n%s", out)
	}
	if code, out, _ := runCLI(t, withToken, "vm", "stop", ref); code != 0 || !strings.Contains(out, "Stopped") {
		t.Errorf("stop: %s", out)
	}
	if code, out, errOut := runCLI(t, withToken, "vm", "logs", "-f", ref); code != 0 || !strings.Contains(out, "VM is not running, past logs sent") {
		t.Errorf("logs of a stopped instance: %d %s %s", code, out, errOut)
	}
	logsURL := "http://127.0.0.1:" + strconv.Itoa(port) + "/control/machine/" + ref + "/logs"
	if status, body := httpGet(t, logsURL); status != 401 {
		t.Errorf("logs without credentials: %d %s", status, body)
	}
	if status, body := operatorGet(t, logsURL); status != 200 || !strings.HasPrefix(body, "[") {
		t.Errorf("past logs of a stopped instance: %d %s", status, body)
	}
	if code, out, _ := runCLI(t, withToken, "vm", "erase", ref); code != 0 || !strings.Contains(out, "Erased") {
		t.Errorf("erase: %s", out)
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "volumes", ref)); !os.IsNotExist(err) {
		t.Errorf("disks left after erase: %v", err)
	}
	cancel()
	if got := notified(); !strings.HasPrefix(got, "STOPPING=1\n") {
		t.Errorf("systemd was told %q when the node stopped", got)
	}
	select {
	case code := <-served:
		if code != 0 {
			t.Errorf("serve exited %d:\n%s", code, serveErr.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("serve did not stop")
	}
	if !strings.Contains(serveErr.String(), "node stopped") {
		t.Errorf("no clean shutdown in the log:\n%s", serveErr.String())
	}
}
