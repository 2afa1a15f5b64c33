package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/network"
)

// programURL is where the node serves a program.
func programURL(port int, ref, path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d/vm/%s%s", port, ref, path)
}

// TestProgramsEndToEnd deploys both examples on a node that boots them
// under QEMU with the guest init, and checks the node's program duties.
func TestProgramsEndToEnd(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64")
	programsEndToEnd(t, "qemu", nil)
}

// TestProgramsUnderFirecracker checks the same duties with the programs
// booted under Firecracker, jailed where a jailer is installed, with the
// control channel over vsock. It skips where Firecracker cannot run, as
// on the machine this project is developed on.
func TestProgramsUnderFirecracker(t *testing.T) {
	fc := testassets.RequireFirecracker(t)
	programsEndToEnd(t, "firecracker", []string{
		"ALEPH_VM_FIRECRACKER_PATH=" + fc.Binary, "ALEPH_VM_JAILER_PATH=" + fc.Jailer,
		"ALEPH_VM_USE_JAILER=" + strconv.FormatBool(fc.Jailer != ""),
	})
}

func programsEndToEnd(t *testing.T, hv string, extraEnv []string) {
	assetsDir := testassets.ProgramAssets(t)
	testenv.RequireTools(t, "nft", "mkfs.ext4", "go")
	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_REUSE_TIMEOUT=20", "ALEPH_VM_INIT_TIMEOUT=180", "ALEPH_VM_PROGRAM_HYPERVISOR="+hv)
	env = append(env, extraEnv...)
	node := startNode(t, env, port)
	if !strings.Contains(node.logs.String(), "programs="+hv) {
		t.Fatalf("the node does not run programs under %s:\n%s", hv, node.logs.String())
	}

	create := func(args ...string) string {
		t.Helper()
		code, out, errOut := runCLI(t, env, append([]string{"program", "create"}, args...)...)
		if code != 0 {
			t.Fatalf("program create %v: %s %s", args, out, errOut)
		}
		return strings.Fields(out)[0]
	}
	asgi := create("../../examples/asgi-hello", "--entrypoint", "main:app", "--env", "GREETING=Howdy")
	goProg := createGoHello(t, env, dir)

	// The ASGI example answers, with its variable.
	status, body := httpGet(t, programURL(port, asgi, "/some/path"))
	if status != 200 || !strings.Contains(body, "Howdy from a Python ASGI program on alephvm (/some/path)") {
		t.Fatalf("asgi: %d %q\n%s", status, body, node.logs.String())
	}

	// 20 concurrent first requests to the Go example boot one VM.
	var wg sync.WaitGroup
	errs := make(chan string, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body := httpGet(t, programURL(port, goProg, "/"))
			if status != 200 || !strings.HasPrefix(body, "Hello from a Go program") {
				errs <- fmt.Sprintf("%d %q", status, body)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Errorf("concurrent first request: %s", e)
	}
	if n := strings.Count(node.logs.String(), `msg="program booted" ref=`+goProg); n != 1 {
		t.Errorf("%d boots of the Go program, want 1", n)
	}

	// A 100 MB upload passes through intact.
	const size = 100 << 20
	h := sha256.New()
	pr, pw := io.Pipe()
	go func() {
		buf := make([]byte, 1<<20)
		for i := range size / len(buf) {
			for j := range buf {
				buf[j] = byte(i ^ j)
			}
			h.Write(buf)
			pw.Write(buf)
		}
		pw.Close()
	}()
	resp, err := http.Post(programURL(port, goProg, "/upload"), "application/octet-stream", pr)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := fmt.Sprintf("%d %s\n", size, hex.EncodeToString(h.Sum(nil))); string(got) != want {
		t.Errorf("upload: %q, want %q", got, want)
	}

	// A websocket echo passes through.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, fmt.Sprintf("ws://127.0.0.1:%d/vm/%s/ws", port, goProg), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, msg := range []string{"ping", strings.Repeat("x", 100_000)} {
		ws.SetReadLimit(1 << 20)
		if err := ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		if _, data, err := ws.Read(ctx); err != nil || string(data) != msg {
			t.Errorf("websocket echo: %d bytes, %v", len(data), err)
		}
	}
	ws.Close(websocket.StatusNormalClosure, "")

	if hv == "qemu" {
		unresponsiveVMIsReplaced(t, node, port, goProg)
	}

	// A program that crashes gives a 502, and its logs say why, to the
	// operator only.
	if status, _ := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/logs", port, goProg)); status != 401 {
		t.Errorf("logs without credentials: %d", status)
	}
	if status, body := httpGet(t, programURL(port, goProg, "/crash")); status != 502 || !strings.Contains(body, "error") {
		t.Errorf("crash: %d %q", status, body)
	}
	var logsOK bool
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && !logsOK; time.Sleep(500 * time.Millisecond) {
		_, logs := operatorGet(t, fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/logs", port, goProg))
		logsOK = strings.Contains(logs, "crashing on purpose") && strings.Contains(logs, "code 3")
	}
	if !logsOK {
		_, logs := operatorGet(t, fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/logs", port, goProg))
		t.Errorf("the logs do not show the crash: %s", logs)
	}

	// A message whose runtime item is missing gets a clear 404.
	missing := create(filepath.Join(dir, "go-hello"), "--entrypoint", "hello", "--interface", "binary", "--runtime", strings.Repeat("ab", 32))
	status, body = httpGet(t, programURL(port, missing, "/"))
	var apiErr struct{ Error string }
	if status != 404 || json.Unmarshal([]byte(body), &apiErr) != nil || !strings.Contains(apiErr.Error, "not found") {
		t.Errorf("missing runtime: %d %s", status, body)
	}

	// Idle past REUSE_TIMEOUT, the VMs stop and free their taps and files.
	deadline := time.Now().Add(90 * time.Second)
	for {
		taps, _ := network.Taps()
		vms, _ := os.ReadDir(filepath.Join(dir, "state", "vms"))
		if len(taps) == 0 && len(vms) == 0 && len(listVMs(t, port)) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("idle programs not stopped: taps %v, VM directories %d, executions %v", taps, len(vms), listVMs(t, port))
		}
		time.Sleep(time.Second)
	}

	// The node stops; alephvm run boots the ASGI program in the foreground
	// on a node of its own, prints its URL and its output.
	node.cmd.Process.Signal(syscall.SIGTERM)
	node.cmd.Wait()
	runCtx, stopRun := context.WithCancel(context.Background())
	defer stopRun()
	out := &syncBuffer{}
	ran := make(chan int, 1)
	go func() { ran <- run(runCtx, []string{"run", asgi}, out, &syncBuffer{}, env) }()
	url := ""
	for deadline := time.Now().Add(3 * time.Minute); url == "" && time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if line, _, ok := strings.Cut(out.String(), "\n"); ok {
			url = line
		}
	}
	if !strings.HasSuffix(url, "/vm/"+asgi+"/") {
		t.Fatalf("run printed %q", out.String())
	}
	if status, body := httpGet(t, url+"from-run"); status != 200 || !strings.Contains(body, "(/from-run)") {
		t.Errorf("run: %d %q", status, body)
	}
	stopRun()
	if code := <-ran; code != 0 {
		t.Errorf("run exited %d", code)
	}
}

// unresponsiveVMIsReplaced cuts the host's packets to ref's running VM
// (dropped at its tap by an nftables egress hook in the test's namespace:
// the guest lives on, hears nothing and sends nothing, as when its
// virtio-net queue stalled) and checks that the node stops that VM once a
// connection to it times out and its tap stays silent, and that the next
// request boots another. Clients that give up after 2 s use up the node's
// kept connections to the VM, on which requests wait in vain; the
// requests after them connect anew.
func unresponsiveVMIsReplaced(t *testing.T, node *nodeProcess, port int, ref string) {
	t.Helper()
	tap := listVMs(t, port)[ref].Networking.Tap
	// The rule matches the tap by its index: a new tap of the same name,
	// the next VM's, is not cut.
	testenv.Cmd(t, "nft", fmt.Sprintf(`add table netdev cut; add chain netdev cut out { type filter hook egress device %q priority 0; policy accept; }; add rule netdev cut out meta oif %q drop`, tap, tap))
	defer exec.Command("nft", "delete table netdev cut").Run()
	quick, cut := &http.Client{Timeout: 2 * time.Second}, time.Now()
	const stopped = "program VM unresponsive"
	for deadline := time.Now().Add(90 * time.Second); !strings.Contains(node.logs.String(), stopped); {
		if time.Now().After(deadline) {
			t.Fatalf("a VM cut from the host was not stopped:\n%s", node.logs.String())
		}
		var wg sync.WaitGroup
		for range 30 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if resp, err := quick.Get(programURL(port, ref, "/")); err == nil {
					resp.Body.Close()
				}
			}()
		}
		wg.Wait()
	}
	if status, body := httpGet(t, programURL(port, ref, "/")); status != 200 || !strings.HasPrefix(body, "Hello from a Go program") {
		t.Fatalf("after its unresponsive VM stopped: %d %q", status, body)
	}
	t.Logf("a VM cut from the host was replaced, and answered again, %s after the cut", time.Since(cut).Round(100*time.Millisecond))
}
