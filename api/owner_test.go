package api

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/aggregate"
	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/internal/alephsdk"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// Fixed test wallets (Hardhat's development accounts).
const (
	ownerKey     = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
	ownerAddress = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
	strangerKey  = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
	delegateKey  = "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a"
	operatorKey  = "7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
)

const (
	progRef = message.ItemHash("1111111111111111111111111111111111111111111111111111111111111111")
	solRef  = message.ItemHash("3333333333333333333333333333333333333333333333333333333333333333")
)

// solOwner is a Solana wallet of a fixed seed.
func solOwner() alephsdk.SOL {
	seed := make([]byte, 32)
	for i := range seed {
		seed[i] = byte(100 + i)
	}
	return alephsdk.NewSOL(seed)
}

func TestSolanaOwner(t *testing.T) {
	r := newOwnerRig(t)
	sol := &alephsdk.Client{Wallet: solOwner(), NodeURL: r.srv.URL, Flavour: alephsdk.TypeScript}
	if status, body, _ := do(t, sol.Request("POST", string(solRef), "start")); status != 200 {
		t.Fatalf("Solana owner: %d %s", status, body)
	}
	if status, _, _ := do(t, sol.Request("POST", string(progRef), "stop")); status != 403 {
		t.Errorf("Solana wallet on another's program: %d", status)
	}
	frames := streamLogs(t, r.srv, solRef, sol.AuthFrame(string(solRef)))
	if len(frames) == 0 || frames[0] != `{"status":"connected"}` {
		t.Errorf("Solana owner's stream: %v", frames)
	}
}

type fakeMachines map[message.ItemHash]Machine

func (f fakeMachines) Machine(_ context.Context, r message.ItemHash) (Machine, error) {
	if m, ok := f[r]; ok {
		return m, nil
	}
	return Machine{}, ErrUnknownMachine
}

type fakeVolumes struct {
	mu     sync.Mutex
	erased []message.ItemHash
}

func (f *fakeVolumes) EraseVolumes(r message.ItemHash) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.erased = append(f.erased, r)
	return nil
}

type ownerRig struct {
	srv      *httptest.Server
	inst     *fakeInstances
	launcher *launcher
	volumes  *fakeVolumes
	api      *httptest.Server // the Aleph API, serving the owner's security aggregate
}

// newOwnerRig serves an instance (ref) and a program (progRef) whose
// messages name ownerAddress; the owner's security aggregate grants the
// delegate its instances.
func newOwnerRig(t *testing.T) *ownerRig {
	r := &ownerRig{launcher: &launcher{handler: echoHandler(), memory: 128, timeout: 5 * time.Second}, volumes: &fakeVolumes{}}
	delegate := alephsdk.NewETH(delegateKey).Address()
	r.api = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path != "/api/v0/aggregates/"+ownerAddress+".json" || req.URL.Query().Get("keys") != "security" {
			http.NotFound(w, req)
			return
		}
		io.WriteString(w, `{"data":{"security":{"authorizations":[{"address":"`+strings.ToLower(delegate)+`","types":["INSTANCE"]}]}}}`)
	}))
	t.Cleanup(r.api.Close)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	r.inst = &fakeInstances{running: map[message.ItemHash]bool{ref: true}, runs: map[message.ItemHash]uint64{}, failing: map[message.ItemHash]bool{}}
	p := pool.New(pool.Options{Launcher: r.launcher, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
	r.srv = httptest.NewServer(New(Options{
		Programs: p, Instances: r.inst, Auth: tokenAuth{}, Logs: &fakeLogs{}, Version: "test", Log: log,
		OwnerAuth: auth.NewOwner(auth.OwnerOptions{Domain: "127.0.0.1"}),
		Machines: fakeMachines{ref: {Owner: ownerAddress, Type: TypeInstance}, progRef: {Owner: ownerAddress, Type: TypeProgram},
			solRef: {Owner: solOwner().Address(), Type: TypeProgram}},
		Grants:    aggregate.New(aggregate.Options{APIServer: r.api.URL}),
		Operators: []string{alephsdk.NewETH(operatorKey).Address()}, ProgramVolumes: r.volumes,
	}))
	t.Cleanup(func() { r.srv.Close(); p.Shutdown(context.Background()) })
	return r
}

func (r *ownerRig) client(key string, f alephsdk.Flavour) *alephsdk.Client {
	return &alephsdk.Client{Wallet: alephsdk.NewETH(key), NodeURL: r.srv.URL, Flavour: f}
}

func do(t *testing.T, req *http.Request) (int, string, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("Content-Type")
}

func TestOwnerRoutes(t *testing.T) {
	r := newOwnerRig(t)
	owner := r.client(ownerKey, alephsdk.Python)
	for _, tc := range []struct {
		vm      message.ItemHash
		op      string
		method  string
		query   string
		want    string
		instOps string
	}{
		{ref, "stop", "POST", "", "Stopped VM with ref " + string(ref), "stop 7eb2ec"},
		{ref, "start", "POST", "", "Started VM with ref " + string(ref), "start 7eb2ec"},
		{ref, "reboot", "POST", "", "Rebooted VM with ref " + string(ref), "reboot 7eb2ec"},
		{ref, "reinstall", "POST", "?erase_volumes=false", "Reinstalled VM with ref " + string(ref), "reinstall 7eb2ec"},
		{ref, "reinstall", "POST", "", "Reinstalled VM with ref " + string(ref), "reinstall+volumes 7eb2ec"},
		{ref, "expire", "POST", "", "Expiring VM with ref " + string(ref) + " in 0 seconds", ""},
		{ref, "erase", "POST", "", "Erased VM with ref " + string(ref), "erase 7eb2ec"},
		{progRef, "start", "POST", "", "Started VM with ref " + string(progRef), ""},
		{progRef, "reboot", "POST", "", "Rebooted VM with ref " + string(progRef), ""},
		{progRef, "reinstall", "POST", "?erase_volumes=false", "Reinstalled VM with ref " + string(progRef), ""},
		{progRef, "reinstall", "POST", "", "Reinstalled VM with ref " + string(progRef), ""},
		{progRef, "stop", "POST", "", "Stopped VM with ref " + string(progRef), ""},
		{progRef, "erase", "POST", "", "Erased VM with ref " + string(progRef), ""},
	} {
		r.inst.reset()
		req := owner.Request(tc.method, string(tc.vm), tc.op)
		req.URL.RawQuery = strings.TrimPrefix(tc.query, "?")
		status, body, _ := do(t, req)
		if status != 200 || body != tc.want {
			t.Errorf("%s %s: %d %s", tc.op, tc.vm[:6], status, body)
		}
		if got := strings.Join(r.inst.seen(), ","); tc.instOps != "" && got != tc.instOps {
			t.Errorf("%s %s: instance calls %q, want %q", tc.op, tc.vm[:6], got, tc.instOps)
		}
		if tc.vm == progRef && len(r.inst.seen()) != 0 {
			t.Errorf("%s of a program called the instances: %v", tc.op, r.inst.seen())
		}
		if tc.op == "expire" {
			// The expiry stops the VM in the background: wait for it, lest
			// its stop land among the next row's calls.
			for deadline := time.Now().Add(5 * time.Second); !slices.Contains(r.inst.seen(), "stop 7eb2ec"); time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("expire in 0 s: no stop within 5 s (%v)", r.inst.seen())
				}
			}
		}
	}
	// A program with a network shows its (no) mapped ports as {}.
	do(t, owner.Request("POST", string(progRef), "start"))
	if _, body := get(t, r.srv.URL+"/v2/about/executions/list", ""); !strings.Contains(body, `"ipv4_network":"172.16.4.0/24","host_ipv4":"172.16.4.1","ipv4_ip":"172.16.4.2","ipv6_network":null,"ipv6_ip":null,"mapped_ports":{}`) {
		t.Errorf("v2 list: %s", body)
	}
	// Boots: start, reboot, two reinstalls, start; volumes erased by the
	// full reinstall and erase.
	if r.launcher.boots != 5 || len(r.volumes.erased) != 2 {
		t.Errorf("%d program boots, volumes erased %v", r.launcher.boots, r.volumes.erased)
	}
	// Logs, past lines, in the reference's shape.
	status, body, _ := do(t, owner.Request("GET", string(ref), "logs"))
	var lines []map[string]any
	if status != 200 || json.Unmarshal([]byte(body), &lines) != nil || len(lines) != 2 ||
		lines[0]["SYSLOG_IDENTIFIER"] != "vm-"+string(ref)+"-stdout" || lines[1]["file"] != "stderr" || lines[0]["__REALTIME_TIMESTAMP"] == nil {
		t.Errorf("logs: %d %s", status, body)
	}
}

func TestOwnerRoutesRefuseOthers(t *testing.T) {
	r := newOwnerRig(t)
	stranger := r.client(strangerKey, alephsdk.TypeScript)
	delegate := r.client(delegateKey, alephsdk.Python)
	for _, vm := range []message.ItemHash{ref, progRef} {
		for _, op := range []string{"stop", "start", "reboot", "reinstall", "expire", "erase"} {
			status, body, ctype := do(t, stranger.Request("POST", string(vm), op))
			if status != 403 || body != "Unauthorized sender" || !strings.HasPrefix(ctype, "text/plain") {
				t.Errorf("stranger %s %s: %d %s %s", op, vm[:6], status, body, ctype)
			}
		}
		if status, _, _ := do(t, stranger.Request("GET", string(vm), "logs")); status != 403 {
			t.Errorf("stranger logs: %d", status)
		}
	}
	if len(r.inst.seen()) != 0 || r.launcher.boots != 0 || len(r.volumes.erased) != 0 {
		t.Fatalf("refused calls acted: %v %d %v", r.inst.seen(), r.launcher.boots, r.volumes.erased)
	}
	// The security aggregate grants the delegate the owner's instances, not
	// its programs.
	if status, body, _ := do(t, delegate.Request("POST", string(ref), "reboot")); status != 200 {
		t.Errorf("delegate on the instance: %d %s", status, body)
	}
	if status, _, _ := do(t, delegate.Request("POST", string(progRef), "reboot")); status != 403 {
		t.Errorf("delegate on the program: %d", status)
	}
	// The operator: by its wallet, and by the scheduler's token.
	operator := r.client(operatorKey, alephsdk.TypeScript)
	if status, body, _ := do(t, operator.Request("POST", string(progRef), "stop")); status != 200 {
		t.Errorf("operator wallet: %d %s", status, body)
	}
	if status, body := post(t, r.srv.URL+"/control/machine/"+string(ref)+"/reinstall", "good", `{"erase_volumes":false}`); status != 200 {
		t.Errorf("operator token: %d %s", status, body)
	}
	if got := r.inst.seen()[len(r.inst.seen())-1]; got != "reinstall 7eb2ec" {
		t.Errorf("operator reinstall: %s", got)
	}
	// A VM this node does not host: 404, whoever asks.
	unknown := "2222222222222222222222222222222222222222222222222222222222222222"
	if status, body, _ := do(t, r.client(ownerKey, alephsdk.Python).Request("POST", unknown, "stop")); status != 404 || !strings.Contains(body, "No virtual machine with ref") {
		t.Errorf("unknown VM: %d %s", status, body)
	}
	// Bad credentials answer before anything is looked up.
	req := stranger.Request("POST", "not-a-hash", "stop")
	req.Header.Set("X-SignedPubKey", "{")
	if status, body, _ := do(t, req); status != 400 || body != `{"error":"Invalid X-SignedPubKey format"}`+"\n" {
		t.Errorf("malformed key: %d %q", status, body)
	}
	req = r.client(ownerKey, alephsdk.Python).Request("POST", string(ref), "stop")
	req.URL.Path = "/control/machine/" + string(ref) + "/erase"
	if status, body, _ := do(t, req); status != 401 || !strings.Contains(body, "Invalid path") {
		t.Errorf("operation for another path: %d %s", status, body)
	}
}

func TestUpdateRoute(t *testing.T) {
	r := newOwnerRig(t)
	for _, path := range []string{"/control/machine/" + string(ref) + "/update", "/control/" + string(ref) + "/update"} {
		status, body := post(t, r.srv.URL+path, "", "")
		if status != 200 || strings.TrimSpace(body) != "{}" {
			t.Errorf("%s: %d %s", path, status, body)
		}
	}
	r.inst.Stop(context.Background(), ref)
	if status, body := post(t, r.srv.URL+"/control/machine/"+string(ref)+"/update", "", ""); status != 200 || !strings.Contains(body, "VM not starting yet") {
		t.Errorf("stopped: %d %s", status, body)
	}
	if status, _ := post(t, r.srv.URL+"/control/machine/2222222222222222222222222222222222222222222222222222222222222222/update", "", ""); status != 404 {
		t.Errorf("unknown: %d", status)
	}
	if status, _ := post(t, r.srv.URL+"/control/machine/nope/update", "", ""); status != 400 {
		t.Errorf("bad ref: %d", status)
	}
}

// streamLogs opens stream_logs, sends first and returns the frames read.
func streamLogs(t *testing.T, srv *httptest.Server, vm message.ItemHash, first []byte) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/control/machine/"+string(vm)+"/stream_logs", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	if err := c.Write(ctx, websocket.MessageText, first); err != nil {
		t.Fatal(err)
	}
	var frames []string
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			return frames
		}
		frames = append(frames, strings.TrimSpace(string(data)))
	}
}

func TestStreamLogs(t *testing.T) {
	r := newOwnerRig(t)
	for _, f := range []alephsdk.Flavour{alephsdk.Python, alephsdk.TypeScript} {
		frames := streamLogs(t, r.srv, ref, r.client(ownerKey, f).AuthFrame(string(ref)))
		want := []string{`{"status":"connected"}`, `{"type":"stdout","message":"listening on 8080"}`, `{"type":"stderr","message":"Traceback"}`,
			`{"type":"system","message":"program ended: exited with code 1"}`, `{"type":"system","message":"VM is not running, past logs sent"}`}
		if strings.Join(frames, "\n") != strings.Join(want, "\n") {
			t.Errorf("flavour %d: got\n%s", f, strings.Join(frames, "\n"))
		}
	}
	tampered := r.client(ownerKey, alephsdk.Python).AuthFrame(string(ref))
	tampered = []byte(strings.Replace(string(tampered), `"signature": "`, `"signature": "00`, 1))
	for name, tc := range map[string]struct {
		frame  []byte
		reason string
	}{
		"another wallet":    {r.client(strangerKey, alephsdk.Python).AuthFrame(string(ref)), "unauthorized sender"},
		"tampered":          {tampered, ""},
		"no auth key":       {[]byte(`{"hello":1}`), "missing 'auth' key in message"},
		"not JSON":          {[]byte(`hello`), ""},
		"signed for stop":   {authFrameFor(t, r, "POST", "/control/machine/"+string(ref)+"/stop"), "Invalid path"},
		"other VM's frame":  {r.client(ownerKey, alephsdk.Python).AuthFrame(string(progRef)), "Invalid path"},
		"credentials empty": {[]byte(`{"auth":{}}`), "Missing X-SignedPubKey header"},
	} {
		frames := streamLogs(t, r.srv, ref, tc.frame)
		var m map[string]string
		if len(frames) != 1 || json.Unmarshal([]byte(frames[0]), &m) != nil || m["status"] != "failed" || !strings.Contains(m["reason"], tc.reason) {
			t.Errorf("%s: %v", name, frames)
		}
	}
	// Unknown VM: 404 before the upgrade.
	resp, body := get(t, r.srv.URL+"/control/machine/2222222222222222222222222222222222222222222222222222222222222222/stream_logs", "")
	if resp.StatusCode != 404 {
		t.Errorf("unknown VM: %d %s", resp.StatusCode, body)
	}
}

// authFrameFor builds a first frame whose operation is signed for another
// method and path.
func authFrameFor(t *testing.T, r *ownerRig, method, path string) []byte {
	c := r.client(ownerKey, alephsdk.Python)
	frame, _ := json.Marshal(map[string]any{"auth": map[string]json.RawMessage{
		"X-SignedPubKey": json.RawMessage(c.PubKeyHeader()), "X-SignedOperation": json.RawMessage(c.Operation(method, path)),
	}})
	return frame
}
