package auth

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/internal/alephsdk"
)

// Fixed test wallets: Hardhat's first two development accounts and a
// Solana key of a fixed seed.
const (
	ethKey      = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
	ethAddress  = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
	ethKey2     = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
	ethAddress2 = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
)

func solWallet() alephsdk.SOL {
	seed := make([]byte, 32)
	for i := range seed {
		seed[i] = byte(i + 1)
	}
	return alephsdk.NewSOL(seed)
}

const (
	nodeURL = "https://crn.example.org"
	domain  = "crn.example.org"
	vm      = "cafecafecafecafecafecafecafecafecafecafecafecafecafecafecafecafe"
)

var testNow = time.Date(2026, 11, 23, 12, 0, 0, 123456000, time.UTC)

func newOwner() *Owner {
	return NewOwner(OwnerOptions{Domain: domain, Now: func() time.Time { return testNow }})
}

func sdk(w alephsdk.Wallet, f alephsdk.Flavour) *alephsdk.Client {
	return &alephsdk.Client{Wallet: w, NodeURL: nodeURL, Flavour: f, Now: func() time.Time { return testNow }}
}

// serverSide turns a client request into what the node's handler sees.
func serverSide(req *http.Request) *http.Request {
	r := httptest.NewRequest(req.Method, req.URL.RequestURI(), nil)
	r.Header = req.Header
	return r
}

func TestFixedWallets(t *testing.T) {
	if got := alephsdk.NewETH(ethKey).Address(); got != ethAddress {
		t.Errorf("address of the first test key: %s", got)
	}
	if got := alephsdk.NewETH(ethKey2).Address(); got != ethAddress2 {
		t.Errorf("address of the second test key: %s", got)
	}
}

func TestSDKHeadersAccepted(t *testing.T) {
	for _, tc := range []struct {
		name   string
		wallet alephsdk.Wallet
		f      alephsdk.Flavour
	}{
		{"python ETH", alephsdk.NewETH(ethKey), alephsdk.Python},
		{"typescript ETH", alephsdk.NewETH(ethKey), alephsdk.TypeScript},
		{"python SOL", solWallet(), alephsdk.Python},
		{"typescript SOL", solWallet(), alephsdk.TypeScript},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := newOwner()
			c := sdk(tc.wallet, tc.f)
			for _, op := range []string{"stop", "reboot", "logs"} {
				method := "POST"
				if op == "logs" {
					method = "GET"
				}
				id, err := o.Verify(serverSide(c.Request(method, vm, op)))
				if err != nil {
					t.Fatalf("%s: %v", op, err)
				}
				if id.Address != tc.wallet.Address() || id.Chain != tc.wallet.Chain() || !id.Is(tc.wallet.Address()) {
					t.Fatalf("%s: identity %+v", op, id)
				}
			}
			var frame struct {
				Auth Credentials `json:"auth"`
			}
			if err := json.Unmarshal(c.AuthFrame(vm), &frame); err != nil {
				t.Fatal(err)
			}
			if _, err := o.VerifyCredentials(context.Background(), frame.Auth, "GET", "/control/machine/"+vm+"/stream_logs"); err != nil {
				t.Fatalf("websocket frame: %v", err)
			}
		})
	}
}

func TestSignerHeadersAccepted(t *testing.T) {
	key, err := ParseWalletKey("0x" + ethKey + "\n")
	if err != nil {
		t.Fatal(err)
	}
	s := NewOwnerSigner(key, domain, func() time.Time { return testNow })
	if !strings.EqualFold(s.Address(), ethAddress) {
		t.Fatalf("signer address %s", s.Address())
	}
	o := newOwner()
	path := "/control/machine/" + vm + "/reinstall"
	h, err := s.Headers("POST", path)
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest("POST", path+"?erase_volumes=false", nil)
	r.Header = h
	if id, err := o.Verify(r); err != nil || !id.Is(ethAddress) {
		t.Fatalf("%+v %v", id, err)
	}
	frame, err := s.AuthFrame("/control/machine/" + vm + "/stream_logs")
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Auth Credentials `json:"auth"`
	}
	if err := json.Unmarshal(frame, &f); err != nil {
		t.Fatal(err)
	}
	if _, err := o.VerifyCredentials(context.Background(), f.Auth, "GET", "/control/machine/"+vm+"/stream_logs"); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "0x1234", strings.Repeat("zz", 32), strings.Repeat("00", 32), strings.Repeat("ff", 32)} {
		if _, err := ParseWalletKey(bad); err == nil {
			t.Errorf("wallet key %q accepted", bad)
		}
	}
}

// editHeader rewrites one field of a header's JSON.
func editHeader(t *testing.T, r *http.Request, name string, edit func(m map[string]any)) {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(r.Header.Get(name)), &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	out, _ := json.Marshal(m)
	r.Header.Set(name, string(out))
}

// editPayload rewrites the hex JSON payload of a header.
func editPayload(t *testing.T, r *http.Request, name string, edit func(p map[string]any)) {
	editHeader(t, r, name, func(m map[string]any) {
		raw, _ := hex.DecodeString(m["payload"].(string))
		var p map[string]any
		if err := json.Unmarshal(raw, &p); err != nil {
			t.Fatal(err)
		}
		edit(p)
		out, _ := json.Marshal(p)
		m["payload"] = hex.EncodeToString(out)
	})
}

func TestOwnerRefusals(t *testing.T) {
	eth := alephsdk.NewETH(ethKey)
	stop := func(c *alephsdk.Client) *http.Request { return serverSide(c.Request("POST", vm, "stop")) }
	for _, tc := range []struct {
		name   string
		req    func(t *testing.T) *http.Request
		status int
		reason string
	}{
		{"no headers", func(t *testing.T) *http.Request { return httptest.NewRequest("POST", "/", nil) },
			400, "Missing X-SignedPubKey header"},
		{"key not JSON", func(t *testing.T) *http.Request {
			r := httptest.NewRequest("POST", "/", nil)
			r.Header.Set("X-SignedPubKey", "invalid_json")
			return r
		}, 400, "Invalid X-SignedPubKey format"},
		{"key without signature", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			editHeader(t, r, "X-SignedPubKey", func(m map[string]any) { delete(m, "signature") })
			return r
		}, 400, "Invalid X-SignedPubKey data"},
		{"key payload not hex", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			editHeader(t, r, "X-SignedPubKey", func(m map[string]any) { m["payload"] = "zz" })
			return r
		}, 400, "Invalid X-SignedPubKey data"},
		{"no operation", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			r.Header.Del("X-SignedOperation")
			return r
		}, 400, "Missing X-SignedOperation header"},
		{"operation not JSON", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			r.Header.Set("X-SignedOperation", "{")
			return r
		}, 400, "Invalid X-SignedOperation fields"},
		{"tampered key payload", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			editPayload(t, r, "X-SignedPubKey", func(p map[string]any) { p["address"] = ethAddress2 })
			return r
		}, 401, "Invalid signature"},
		{"tampered operation payload", func(t *testing.T) *http.Request {
			c := sdk(eth, alephsdk.Python)
			r := serverSide(c.Request("POST", vm, "stop"))
			// The operation is re-signed for erase but sent as stop's.
			r.URL.Path = "/control/machine/" + vm + "/erase"
			editPayload(t, r, "X-SignedOperation", func(p map[string]any) { p["path"] = r.URL.Path })
			return r
		}, 401, "Signature could not verified"},
		{"key signed by another wallet", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			other := stop(sdk(alephsdk.NewETH(ethKey2), alephsdk.Python))
			editHeader(t, r, "X-SignedPubKey", func(m map[string]any) {
				var o map[string]any
				json.Unmarshal([]byte(other.Header.Get("X-SignedPubKey")), &o)
				m["signature"] = o["signature"]
			})
			return r
		}, 401, "Invalid signature"},
		{"Solana key tampered", func(t *testing.T) *http.Request {
			r := stop(sdk(solWallet(), alephsdk.TypeScript))
			editPayload(t, r, "X-SignedPubKey", func(p map[string]any) { p["expires"] = "2099-01-01T00:00:00Z" })
			return r
		}, 401, "Invalid signature"},
		{"wrong domain", func(t *testing.T) *http.Request {
			c := sdk(eth, alephsdk.Python)
			c.NodeURL = "https://other.example.org"
			return stop(c)
		}, 401, "Invalid domain: Signed: 'other.example.org' != Request: 'crn.example.org'"},
		{"operation for another domain", func(t *testing.T) *http.Request {
			c := sdk(eth, alephsdk.Python)
			c.NodeURL = "https://other.example.org"
			c.KeyDomain = domain
			return stop(c)
		}, 401, "Invalid domain: Signed: 'other.example.org' != Request: 'crn.example.org'"},
		{"wrong path", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			r.URL.Path = "/control/machine/" + vm + "/erase"
			return r
		}, 401, "Invalid path. Signed: '/control/machine/" + vm + "/stop' !=  requested path: '/control/machine/" + vm + "/erase'"},
		{"wrong method", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			r.Method = "DELETE"
			return r
		}, 401, "Invalid method. Signed: 'POST' !=  request:'DELETE"},
		{"expired key", func(t *testing.T) *http.Request {
			c := sdk(eth, alephsdk.Python)
			c.KeyLifetime = -time.Second
			return stop(c)
		}, 401, "Token expired"},
		{"stale time", func(t *testing.T) *http.Request {
			c := sdk(eth, alephsdk.Python)
			c.Now = func() time.Time { return testNow.Add(-2*time.Minute - time.Second) }
			return stop(c)
		}, 400, "Invalid X-SignedOperation fields"},
		{"time in the future", func(t *testing.T) *http.Request {
			c := sdk(eth, alephsdk.TypeScript)
			c.Now = func() time.Time { return testNow.Add(3 * time.Minute) }
			return stop(c)
		}, 400, "Invalid X-SignedOperation fields"},
		{"method outside the schema", func(t *testing.T) *http.Request {
			r := serverSide(sdk(eth, alephsdk.Python).Request("PUT", vm, "stop"))
			return r
		}, 400, "Invalid X-SignedOperation fields"},
		{"operation signature truncated", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			editHeader(t, r, "X-SignedOperation", func(m map[string]any) { m["signature"] = m["signature"].(string)[:64] })
			return r
		}, 401, "Signature could not verified"},
		{"unsupported chain", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			editPayload(t, r, "X-SignedPubKey", func(p map[string]any) { p["chain"] = "AVAX" })
			return r
		}, 400, "Invalid X-SignedPubKey data"},
		{"expires as a number", func(t *testing.T) *http.Request {
			r := stop(sdk(eth, alephsdk.Python))
			editPayload(t, r, "X-SignedPubKey", func(p map[string]any) { p["expires"] = 4102444800 })
			return r
		}, 400, "Invalid X-SignedPubKey data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newOwner().Verify(tc.req(t))
			e, ok := err.(*Error)
			if !ok || e.Status != tc.status || e.Reason != tc.reason {
				t.Fatalf("got %v (%T), want %d %q", err, err, tc.status, tc.reason)
			}
		})
	}
}

func TestOwnerKeyChecks(t *testing.T) {
	// A key that is not a usable P-256 verification key is refused even
	// when the wallet signed it.
	for name, jwk := range map[string]map[string]any{
		"wrong curve":      {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
		"off the curve":    {"kty": "EC", "crv": "P-256", "x": strings.Repeat("A", 43), "y": strings.Repeat("A", 43)},
		"not for verify":   {"kty": "EC", "crv": "P-256", "x": strings.Repeat("A", 43), "y": strings.Repeat("A", 43), "key_ops": []string{"sign"}},
		"short coordinate": {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
	} {
		t.Run(name, func(t *testing.T) {
			wallet := alephsdk.NewETH(ethKey)
			payload, _ := json.Marshal(map[string]any{"pubkey": jwk, "alg": "ECDSA", "domain": domain, "address": wallet.Address(),
				"expires": "2099-01-01T00:00:00Z", "chain": "ETH"})
			h, _ := json.Marshal(map[string]string{"payload": hex.EncodeToString(payload), "signature": "0x" + hex.EncodeToString(wallet.SignRaw(payload))})
			r := httptest.NewRequest("POST", "/", nil)
			r.Header.Set("X-SignedPubKey", string(h))
			r.Header.Set("X-SignedOperation", `{"payload":"","signature":""}`)
			_, err := newOwner().Verify(r)
			if e, ok := err.(*Error); !ok || e.Status != 400 {
				t.Fatalf("got %v", err)
			}
		})
	}
}

func TestOwnerHighSAndReplay(t *testing.T) {
	o := newOwner()
	c := sdk(alephsdk.NewETH(ethKey), alephsdk.Python)
	r := serverSide(c.Request("POST", vm, "stop"))
	// eth_account takes the high-s twin of a wallet signature.
	editHeader(t, r, "X-SignedPubKey", func(m map[string]any) {
		sig, _ := hex.DecodeString(strings.TrimPrefix(m["signature"].(string), "0x"))
		m["signature"] = "0x" + hex.EncodeToString(alephsdk.HighS(sig))
	})
	replay := r.Clone(r.Context())
	if _, err := o.Verify(r); err != nil {
		t.Fatalf("high-s: %v", err)
	}
	_, err := o.Verify(replay)
	if e, ok := err.(*Error); !ok || e.Status != 401 {
		t.Fatalf("replayed operation: %v", err)
	}
	// A fresh operation with the same key is fine.
	c.Now = func() time.Time { return testNow.Add(time.Millisecond) }
	if _, err := o.Verify(serverSide(c.Request("POST", vm, "stop"))); err != nil {
		t.Fatal(err)
	}
}

func TestOwnerKeyCache(t *testing.T) {
	now := testNow
	o := NewOwner(OwnerOptions{Domain: domain, MaxKeys: 2, MaxOperations: 3, Now: func() time.Time { return now }})
	clients := []*alephsdk.Client{}
	for range 5 {
		c := sdk(alephsdk.NewETH(ethKey), alephsdk.TypeScript)
		c.Now = func() time.Time { return now }
		clients = append(clients, c)
		for range 2 {
			if _, err := o.Verify(serverSide(c.Request("POST", vm, "reboot"))); err != nil {
				t.Fatal(err)
			}
			now = now.Add(time.Millisecond)
		}
	}
	if len(o.keys) > 2 || o.replays.(*memoryReplays).len() > 3 {
		t.Fatalf("caches hold %d keys and %d operations, past their bounds", len(o.keys), o.replays.(*memoryReplays).len())
	}
	// A cached key still expires.
	now = testNow.Add(25 * time.Hour)
	last := clients[len(clients)-1]
	_, err := o.Verify(serverSide(last.Request("POST", vm, "reboot")))
	if e, ok := err.(*Error); !ok || e.Reason != "Token expired" {
		t.Fatalf("expired cached key: %v", err)
	}
}

func TestOperationTimes(t *testing.T) {
	for in, ok := range map[string]bool{
		`"2026-11-23T12:00:00Z"`:             true,
		`"2026-11-23T12:00:00.123Z"`:         true,
		`"2026-11-23T12:00:00.123456Z"`:      true,
		`"2026-11-23T12:00:00.123456+00:00"`: true,
		`"2026-11-23T12:00:00"`:              true,
		`1795435200`:                         true,
		`"1795435200.5"`:                     true,
		`"yesterday"`:                        false,
		`-1`:                                 false,
		`1e300`:                              false,
		`null`:                               false,
		`{}`:                                 false,
	} {
		if _, err := parseOperationTime(json.RawMessage(in)); (err == nil) != ok {
			t.Errorf("%s: %v", in, err)
		}
	}
}

func TestCheckWalletAddress(t *testing.T) {
	for addr, ok := range map[string]bool{
		ethAddress: true, strings.ToLower(ethAddress): true, solWallet().Address(): true,
		"0x1234": false, "": false, "hello": false, "0xZZ9Fd6e51aad88F6F4ce6aB8827279cffFb92266": false,
		"11111111111111111111111111111111111111111111111111": false,
	} {
		if err := CheckWalletAddress(addr); (err == nil) != ok {
			t.Errorf("%q: %v", addr, err)
		}
	}
}

// An owner's operation is remembered in the node's database, so that a
// restarted node refuses its replay within the time window too.
func TestOwnerReplayAfterARestart(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "node.db")
	log := slog.New(slog.DiscardHandler)
	database, err := db.Open(ctx, path, log)
	if err != nil {
		t.Fatal(err)
	}
	c := sdk(alephsdk.NewETH(ethKey), alephsdk.Python)
	r := serverSide(c.Request("POST", vm, "reinstall"))
	replay := r.Clone(r.Context())
	o := NewOwner(OwnerOptions{Domain: domain, Now: func() time.Time { return testNow }, DB: database})
	if _, err := o.Verify(r); err != nil {
		t.Fatalf("first use: %v", err)
	}
	database.Close()

	database, err = db.Open(ctx, path, log)
	if err != nil {
		t.Fatal(err)
	}
	defer database.Close()
	restarted := NewOwner(OwnerOptions{Domain: domain, Now: func() time.Time { return testNow }, DB: database})
	var aerr *Error
	if _, err := restarted.Verify(replay); !errors.As(err, &aerr) || aerr.Status != http.StatusUnauthorized {
		t.Fatalf("replay after a restart: %v, want 401", err)
	}

	// A cache that cannot be written refuses the call rather than let a
	// replay through.
	database.Close()
	c.Now = func() time.Time { return testNow.Add(time.Second) }
	if _, err := restarted.Verify(serverSide(c.Request("POST", vm, "stop"))); !errors.As(err, &aerr) || aerr.Status != http.StatusServiceUnavailable {
		t.Errorf("with the database gone: %v, want 503", err)
	}
}
