package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
)

// Fixed test wallets (Hardhat's first two development accounts).
const (
	ownerWalletKey  = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
	ownerWallet     = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
	strangerWallKey = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
)

// ownedBy stores a copy of message ref whose content names owner, and
// returns its hash.
func ownedBy(t *testing.T, env []string, dir string, ref, owner string) string {
	t.Helper()
	code, raw, errOut := runCLI(t, env, "message", "get", ref)
	if code != 0 {
		t.Fatalf("message get: %s", errOut)
	}
	var msg map[string]any
	if err := json.Unmarshal([]byte(raw), &msg); err != nil {
		t.Fatal(err)
	}
	msg["content"].(map[string]any)["address"] = owner
	msg["sender"] = owner
	data, _ := json.Marshal(msg)
	data, err := message.Regenerate(data)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, ref+".owned.json")
	os.WriteFile(file, data, 0o644)
	code, out, errOut := runCLI(t, env, "message", "add", file)
	if code != 0 {
		t.Fatalf("message add: %s %s", out, errOut)
	}
	return strings.Fields(out)[1]
}

// aggregateAPI is the Aleph API as far as the node asks it here: the
// owner's port-forwarding aggregate.
type aggregateAPI struct {
	mu    sync.Mutex
	ports string // the port-forwarding aggregate's value
}

func (a *aggregateAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r.URL.Path != "/api/v0/aggregates/"+ownerWallet+".json" || r.URL.Query().Get("keys") != "port-forwarding" || a.ports == "" {
		http.NotFound(w, r)
		return
	}
	fmt.Fprintf(w, `{"address":%q,"data":{"port-forwarding":%s}}`, ownerWallet, a.ports)
}

// TestOwnerEndToEnd runs a node with an instance and a program whose
// messages name a test wallet as their owner: that wallet stops, reboots,
// reinstalls and reads the logs of both through alephvm vm --key, another
// wallet is refused (403) on each, and the operator still acts on both.
func TestOwnerEndToEnd(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img", "nft", "mkfs.ext4")
	assetsDir := testassets.ProgramAssets(t)
	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	agg := &aggregateAPI{}
	api := httptest.NewServer(agg)
	defer api.Close()
	node := fmt.Sprintf("http://127.0.0.1:%d", port)
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_INIT_TIMEOUT=180", "ALEPH_VM_PROGRAM_HYPERVISOR=qemu",
		"ALEPH_VM_DOMAIN_NAME=127.0.0.1", "ALEPH_VM_API_SERVER="+api.URL)
	n := startNode(t, env, port)
	logs := func() string { return n.logs.String() }
	// Program VMs end with the node's clean shutdown; instances outlive it
	// and are erased first, on every path.
	t.Cleanup(func() {
		n.cmd.Process.Signal(syscall.SIGTERM)
		n.cmd.Wait()
	})
	var inst string
	t.Cleanup(func() {
		if inst != "" {
			runCLI(t, env, "vm", "erase", inst)
		}
	})

	ownerKey := filepath.Join(dir, "owner.key")
	strangerKey := filepath.Join(dir, "stranger.key")
	os.WriteFile(ownerKey, []byte(ownerWalletKey+"\n"), 0o600)
	os.WriteFile(strangerKey, []byte(strangerWallKey), 0o600)
	// The owner and the stranger sign; neither has the operator's token.
	noToken := slices.DeleteFunc(slices.Clone(env), func(s string) bool { return strings.HasPrefix(s, "ALEPH_VM_ALLOCATION_TOKEN=") })
	as := func(key string, args ...string) (int, string, string) {
		t.Helper()
		return runCLI(t, noToken, append(args, "--key", key, "--node", node)...)
	}

	// The instance: a disk whose boot code halts the CPU,
	// and the asgi example, both owned by the test wallet.
	base := filepath.Join(dir, "base.img")
	img := make([]byte, 16<<20)
	copy(img, []byte{0xfa, 0xf4, 0xeb, 0xfd}) // boot code: cli; hlt; jmp to hlt
	img[510], img[511] = 0x55, 0xaa
	os.WriteFile(base, img, 0o644)
	code, out, errOut := runCLI(t, env, "instance", "create", "--image", base, "--size", "64", "--memory", "128")
	if code != 0 {
		t.Fatalf("instance create: %s %s", out, errOut)
	}
	inst = ownedBy(t, env, dir, strings.TrimSpace(out), ownerWallet)
	code, out, errOut = runCLI(t, env, "program", "create", "../../examples/asgi-hello", "--entrypoint", "main:app", "--env", "GREETING=Howdy")
	if code != 0 {
		t.Fatalf("program create: %s %s", out, errOut)
	}
	prog := ownedBy(t, env, dir, strings.Fields(out)[0], ownerWallet)
	agg.mu.Lock()
	agg.ports = `{"` + inst + `":{"ports":{"8080":{"tcp":true,"udp":true}}}}`
	agg.mu.Unlock()

	// The scheduler allocates the instance; the program boots on a request.
	if code, out, errOut := runCLI(t, env, "vm", "start", inst); code != 0 {
		t.Fatalf("operator start: %s %s\n%s", out, errOut, logs())
	}
	programAnswers := func(what string) {
		t.Helper()
		if status, body := httpGet(t, programURL(port, prog, "/")); status != 200 || !strings.Contains(body, "Howdy") {
			t.Fatalf("%s: program answers %d %q\n%s", what, status, body, logs())
		}
	}
	programAnswers("first request")
	// The owner's port-forwarding aggregate is applied with published_ports.
	if code, out, _ := runCLI(t, env, "vm", "list"); code != 0 || !strings.Contains(out, "->8080") || !strings.Contains(out, "->22") {
		t.Errorf("list lacks the aggregate's port:\n%s", out)
	}

	// Another wallet is refused on every route of both VMs.
	for _, vm := range []string{inst, prog} {
		for _, op := range [][]string{{"stop"}, {"reboot"}, {"reinstall"}, {"erase"}, {"expire"}, {"start"}, {"logs"}} {
			code, _, errOut := as(strangerKey, append([]string{"vm"}, append(op, vm)...)...)
			if code == 0 || !strings.Contains(errOut, "403") || !strings.Contains(errOut, "Unauthorized sender") {
				t.Errorf("stranger %s %s: %d %s", op[0], vm[:8], code, errOut)
			}
		}
		code, _, errOut := as(strangerKey, "vm", "logs", "-f", vm)
		if code == 0 || !strings.Contains(errOut, "unauthorized sender") {
			t.Errorf("stranger logs -f %s: %d %s", vm[:8], code, errOut)
		}
	}
	if status, _ := httpGet(t, programURL(port, prog, "/")); status != 200 {
		t.Fatal("the stranger's calls touched the program")
	}

	// The owner reboots and reinstalls both (each program boot takes a
	// while under TCG: the program is reinstalled once).
	for vm, ops := range map[string][][]string{
		inst: {{"reboot"}, {"reinstall", "--keep-volumes"}, {"reinstall"}},
		prog: {{"reboot"}, {"reinstall"}},
	} {
		for _, op := range ops {
			code, out, errOut := as(ownerKey, append(append([]string{"vm"}, op...), vm)...)
			if code != 0 || !strings.Contains(out, "VM with ref "+vm) {
				t.Fatalf("owner %v %s: %d %s %s\n%s", op, vm[:8], code, out, errOut, logs())
			}
		}
	}
	programAnswers("after the owner's reinstall")
	if code, out, errOut := as(ownerKey, "vm", "logs", prog); code != 0 {
		t.Errorf("owner past logs: %s %s", out, errOut)
	}

	// The owner follows the logs of both, then stops them: each stream
	// ends when its VM stops.
	type followed struct {
		code     int
		out, err string
	}
	results := map[string]chan followed{}
	for _, vm := range []string{inst, prog} {
		ch := make(chan followed, 1)
		results[vm] = ch
		go func() {
			code, out, errOut := as(ownerKey, "vm", "logs", "-f", vm)
			ch <- followed{code, out, errOut}
		}()
	}
	time.Sleep(2 * time.Second) // let both streams connect
	for _, vm := range []string{inst, prog} {
		if code, out, errOut := as(ownerKey, "vm", "stop", vm); code != 0 || !strings.Contains(out, "Stopped VM with ref "+vm) {
			t.Errorf("owner stop %s: %d %s %s", vm[:8], code, out, errOut)
		}
	}
	for vm, ch := range results {
		select {
		case r := <-ch:
			if r.code != 0 || !strings.Contains(r.out, "VM is not running, past logs sent") {
				t.Errorf("owner logs -f %s: %d %s %s", vm[:8], r.code, r.out, r.err)
			}
		case <-time.After(90 * time.Second):
			t.Errorf("the log stream of %s did not end when it stopped", vm[:8])
		}
	}

	// The operator, with its token, still acts on both.
	for vm, ops := range map[string][]string{inst: {"start", "reboot", "stop"}, prog: {"reboot", "stop"}} {
		for _, op := range ops {
			if code, out, errOut := runCLI(t, env, "vm", op, vm); code != 0 {
				t.Errorf("operator %s %s: %s %s", op, vm[:8], out, errOut)
			}
		}
		if code, out, errOut := runCLI(t, env, "vm", "logs", vm); code != 0 {
			t.Errorf("operator logs %s: %s %s", vm[:8], out, errOut)
		}
	}
	// The SDKs' update call re-reads the aggregate, unauthenticated.
	resp, err := http.Post(node+"/control/machine/"+inst+"/update", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("update: %d %s", resp.StatusCode, body)
	}
	if code, out, _ := as(ownerKey, "vm", "erase", inst); code != 0 || !strings.Contains(out, "Erased") {
		t.Errorf("owner erase: %s", out)
	}
}
