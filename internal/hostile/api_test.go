package hostile

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/internal/alephsdk"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// The API rig: api.Server with the node's real authenticators (the
// scheduler's token and signers, the owner scheme) and fakes of the pool,
// the instance manager, the machines it hosts and their logs.

const (
	domain        = "node.example"
	operatorToken = "operator-token"
	// ownedRef is an instance the rig hosts, owned by owner; strangerRef
	// one it does not host.
	ownedRef    = message.ItemHash("7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003")
	strangerRef = message.ItemHash("0c1b2a3948576f8e9dacbbc1d2e3f405162738495a6b7c8d9eafb0c1d2e3f405")
	// Fixed keys, so that the addresses in the answers stay the same.
	ownerKey     = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
	strangerKey  = "8da4ef21b864d2cc526dbdb2a120bd2874c36c9d0a1fb7f8c63d7f7a8b41de8f"
	schedulerKey = "1ab42cc412b618bdea3a599e3c9bae199ebf030895b039e9db1e30dafb12b727"
)

var (
	owner     = alephsdk.NewETH(ownerKey)
	stranger  = alephsdk.NewETH(strangerKey)
	scheduler = alephsdk.NewETH(schedulerKey)
)

// rig is a running API and what it was built from.
type rig struct {
	url    string
	server *api.Server
	client *http.Client
}

type rigOptions struct {
	logs api.Logs
}

func newRig(t *testing.T, o rigOptions) *rig {
	t.Helper()
	tokenHash := sha256.Sum256([]byte(operatorToken))
	alloc, err := auth.NewAllocation(auth.AllocationOptions{TokenHash: hex.EncodeToString(tokenHash[:]), Signers: []string{scheduler.Address()}})
	if err != nil {
		t.Fatal(err)
	}
	logs := o.logs
	if logs == nil {
		logs = pastLogs{}
	}
	s := api.New(api.Options{
		Programs:  fakePrograms{},
		Instances: fakeInstances{},
		Auth:      alloc,
		OwnerAuth: auth.NewOwner(auth.OwnerOptions{Domain: domain}),
		Machines:  fakeMachines{},
		Storage:   fakeStorage{},
		Domain:    domain,
		Logs:      logs,
		// Small bounds, so that the rows cross them cheaply.
		MaxBodyBytes: 1 << 20,
		Limits: api.Limits{ReadHeaderTimeout: 300 * time.Millisecond, ReadTimeout: 5 * time.Second,
			WriteTimeout: 500 * time.Millisecond, IdleTimeout: 5 * time.Second, MaxConnections: 64},
		MaxLogFollowers: 8, MaxLogFollowersPerVM: 2,
		Version: "test",
		Log:     slog.New(slog.DiscardHandler),
	})
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = s.HTTPServer()
	srv.Listener = s.Listener(srv.Listener)
	srv.Start()
	t.Cleanup(srv.Close)
	// No kept-alive connections: nothing of a row outlives it.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	return &rig{url: srv.URL, server: s, client: client}
}

// do sends a request and returns its answer: the status and the body.
func (r *rig) do(t *testing.T, req *http.Request) answer {
	t.Helper()
	resp, err := r.client.Do(req)
	if err != nil {
		t.Errorf("no answer: %v", err)
		return answer{kind: refused, text: "NO ANSWER: " + err.Error()}
	}
	defer resp.Body.Close()
	return httpAnswer(t, resp)
}

// httpAnswer reads a refusal: a status of 400 or more, with a message.
func httpAnswer(t *testing.T, resp *http.Response) answer {
	t.Helper()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	text := strings.TrimSpace(string(body))
	if resp.StatusCode < 400 {
		t.Errorf("status %d: want a refusal", resp.StatusCode)
	}
	if text == "" {
		t.Errorf("status %d without a message", resp.StatusCode)
	}
	if status := strconv.Itoa(resp.StatusCode); !strings.HasPrefix(text, status) {
		text = status + " " + text
	}
	return answer{kind: refused, text: text}
}

func (r *rig) request(t *testing.T, method, path, body string, header http.Header) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, r.url+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	return req
}

// raw sends bytes on a connection of their own and reads the answer, or
// says how the node closed the connection without one.
func (r *rig) raw(t *testing.T, data []byte, slow time.Duration) answer {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(r.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		for len(data) > 0 {
			n := len(data)
			if slow > 0 {
				n = 1
				time.Sleep(slow)
			}
			if _, err := conn.Write(data[:n]); err != nil {
				return
			}
			data = data[n:]
		}
	}()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return answer{kind: refused, text: "connection closed by the node without an answer (" + closeReason(err) + ")"}
	}
	defer resp.Body.Close()
	return httpAnswer(t, resp)
}

func closeReason(err error) string {
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		return "EOF"
	case strings.Contains(err.Error(), "connection reset"):
		return "reset"
	}
	return err.Error()
}

// schedulerHeader signs a call as the scheduler does (Aleph-EIP191-V1),
// with key, for method and path, at iat.
func schedulerHeader(key alephsdk.ETH, method, path, body string, iat time.Time) http.Header {
	sum := sha256.Sum256([]byte(body))
	payload, _ := json.Marshal(map[string]any{"method": method, "path": path, "body_sha256": hex.EncodeToString(sum[:]), "iat": iat.Unix()})
	sig := key.SignRaw(payload)
	return http.Header{"Authorization": {fmt.Sprintf("Aleph-EIP191-V1 sig=0x%x,payload=0x%x", sig, payload)}}
}

func tokenHeader() http.Header { return http.Header{"X-Auth-Signature": {operatorToken}} }

// sdk is an Aleph SDK client of wallet for the rig's node.
func (r *rig) sdk(wallet alephsdk.Wallet) *alephsdk.Client {
	return &alephsdk.Client{Wallet: wallet, NodeURL: "https://" + domain}
}

// ownerRequest is the SDK's request, sent to the rig.
func (r *rig) ownerRequest(t *testing.T, c *alephsdk.Client, method string, ref message.ItemHash, op string) *http.Request {
	t.Helper()
	req := c.Request(method, string(ref), op)
	req2 := r.request(t, method, req.URL.Path, "", req.Header)
	return req2
}

// liar claims one wallet's address and signs with another's key.
type liar struct {
	alephsdk.ETH
	address string
}

func (l liar) Address() string { return l.address }

// Fakes.

type itemNotFound struct{ ref message.ItemHash }

func (e itemNotFound) Error() string   { return "Item " + string(e.ref) + " not found" }
func (e itemNotFound) HTTPStatus() int { return http.StatusNotFound }

// fakePrograms hosts no program: every program is unknown.
type fakePrograms struct{}

func (fakePrograms) Acquire(_ context.Context, ref message.ItemHash) (*pool.Lease, error) {
	return nil, itemNotFound{ref}
}
func (fakePrograms) Stop(message.ItemHash) bool                               { return false }
func (fakePrograms) StopWait(context.Context, message.ItemHash) (bool, error) { return false, nil }
func (fakePrograms) List() []pool.ExecutionInfo                               { return nil }
func (fakePrograms) Kept(message.ItemHash) bool                               { return false }
func (fakePrograms) Keep(message.ItemHash)                                    {}
func (fakePrograms) SetPersistent(_ context.Context, refs []message.ItemHash) map[message.ItemHash]error {
	errs := map[message.ItemHash]error{}
	for _, ref := range refs {
		errs[ref] = itemNotFound{ref}
	}
	return errs
}

// fakeInstances runs every instance it is asked to, at once.
type fakeInstances struct{}

func (fakeInstances) Start(context.Context, message.ItemHash) error           { return nil }
func (fakeInstances) Stop(context.Context, message.ItemHash) (bool, error)    { return true, nil }
func (fakeInstances) Reboot(context.Context, message.ItemHash) error          { return nil }
func (fakeInstances) Erase(context.Context, message.ItemHash) error           { return nil }
func (fakeInstances) Reinstall(context.Context, message.ItemHash, bool) error { return nil }
func (fakeInstances) UpdatePorts(context.Context, message.ItemHash) (bool, error) {
	return true, nil
}
func (fakeInstances) Running(message.ItemHash) bool       { return true }
func (fakeInstances) Run(message.ItemHash) (uint64, bool) { return 1, true }
func (fakeInstances) StopRun(context.Context, message.ItemHash, uint64) (bool, error) {
	return true, nil
}
func (fakeInstances) Allocate(_ context.Context, desired []message.ItemHash) api.AllocationResult {
	res := api.AllocationResult{Success: true, Errors: map[string]string{}}
	for _, d := range desired {
		res.Successful = append(res.Successful, string(d))
	}
	return res
}
func (fakeInstances) Statuses(context.Context) ([]api.InstanceStatus, error) { return nil, nil }

// fakeMachines hosts ownedRef, an instance of owner.
type fakeMachines struct{}

func (fakeMachines) Machine(_ context.Context, ref message.ItemHash) (api.Machine, error) {
	if ref == ownedRef {
		return api.Machine{Owner: owner.Address(), Type: api.TypeInstance}, nil
	}
	return api.Machine{}, api.ErrUnknownMachine
}

// pastLogs has two past lines of every VM; a follower then waits for the
// VM's next line until it goes.
type pastLogs struct{}

func (pastLogs) Follow(ctx context.Context, _ message.ItemHash, fn func(api.LogLine) error) (bool, bool, error) {
	for _, text := range []string{"booting", "ready"} {
		if err := fn(api.LogLine{Time: time.Unix(1700000000, 0), Stream: "stdout", Text: text}); err != nil {
			return true, false, err
		}
	}
	<-ctx.Done()
	return true, false, nil
}

// floodLogs sends lines of 64 KiB as fast as its follower takes them.
type floodLogs struct{ following atomic.Int32 }

func (f *floodLogs) Follow(ctx context.Context, _ message.ItemHash, fn func(api.LogLine) error) (bool, bool, error) {
	f.following.Add(1)
	defer f.following.Add(-1)
	line := strings.Repeat("x", 64<<10)
	for {
		if err := fn(api.LogLine{Time: time.Unix(1700000000, 0), Stream: "stdout", Text: line}); err != nil {
			return true, false, err
		}
	}
}

// fakeStorage walks nothing: the rows check who may call it and with what.
type fakeStorage struct{}

func (fakeStorage) Status(context.Context) (diskusage.Report, error) { return diskusage.Report{}, nil }
func (fakeStorage) Reclaim(_ context.Context, dry bool) (diskusage.Result, error) {
	return diskusage.Result{DryRun: dry, Items: []diskusage.Item{}}, nil
}
