package guestapi

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

var (
	progA = message.ItemHash(strings.Repeat("aa", 32))
	progB = message.ItemHash(strings.Repeat("bb", 32))
)

func newService(t *testing.T, opts Options) *Service {
	t.Helper()
	if opts.DB == nil {
		d, err := db.Open(context.Background(), filepath.Join(t.TempDir(), "node.sqlite"), slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		opts.DB = d
	}
	return New(opts)
}

func call(t *testing.T, s *Service, ref message.ItemHash, method, path string, body []byte) (int, string) {
	t.Helper()
	a := s.Handler(ref)(context.Background(), guest.APICall{ID: 1, Method: method, Path: path, Body: body})
	return a.Status, string(a.Body)
}

func TestCache(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	s := newService(t, Options{MaxKeysPerProgram: 3, now: func() time.Time { return now }})
	for _, tc := range []struct {
		ref                message.ItemHash
		method, path, body string
		status             int
		want               string
	}{
		{progA, "PUT", "/cache/a", "42", 200, "true"},
		{progA, "GET", "/cache/a", "", 200, "42"},
		{progB, "GET", "/cache/a", "", 404, "No such key in cache"}, // namespaced per program
		{progA, "PUT", "/cache/a", "43", 200, "true"},
		{progA, "GET", "/cache/a", "", 200, "43"},
		{progA, "PUT", "/cache/b_1", "x", 200, "true"},
		{progA, "PUT", "/cache/c", "x", 200, "true"},
		{progA, "PUT", "/cache/d", "x", 507, "A program keeps at most 3 keys in the cache"},
		{progA, "PUT", "/cache/a", "44", 200, "true"}, // an update is no new key
		{progA, "GET", "/cache/", "", 200, `["a","b_1","c"]`},
		{progA, "GET", "/cache/?pattern=b*", "", 200, `["b_1"]`},
		{progA, "GET", "/cache/?pattern=?", "", 200, `["a","c"]`},
		{progB, "GET", "/cache/?pattern=*", "", 200, `[]`},
		{progA, "DELETE", "/cache/c", "", 200, "1"},
		{progA, "DELETE", "/cache/c", "", 200, "0"},
		{progA, "GET", "/cache/c", "", 404, "No such key in cache"},
	} {
		status, body := call(t, s, tc.ref, tc.method, tc.path, []byte(tc.body))
		if status != tc.status || body != tc.want {
			t.Errorf("%s %s %s: %d %q, want %d %q", tc.ref[:4], tc.method, tc.path, status, body, tc.status, tc.want)
		}
	}
	// Past the TTL, entries are gone, and the sweep removes them.
	now = now.Add(DefaultCacheTTL + time.Second)
	if status, _ := call(t, s, progA, "GET", "/cache/a", nil); status != 404 {
		t.Errorf("an expired entry: %d", status)
	}
	if err := s.sweep(context.Background()); err != nil {
		t.Fatal(err)
	}
	var n int
	s.opts.DB.QueryRow(`SELECT count(*) FROM guest_cache`).Scan(&n)
	if n != 0 {
		t.Errorf("%d entries after the sweep", n)
	}
}

func TestCacheHostileKeys(t *testing.T) {
	s := newService(t, Options{MaxValueSize: 8, MaxCacheSize: 35})
	for _, tc := range []struct {
		method, path, body string
		status             int
	}{
		{"PUT", "/cache/../../etc/passwd", "x", 400},
		{"PUT", "/cache/a/b", "x", 400},
		{"PUT", "/cache/a%00b", "x", 400},
		{"PUT", "/cache/" + strings.Repeat("k", maxKeyLength+1), "x", 400},
		{"PUT", "/cache/", "x", 400},
		{"PUT", "/cache/big", "123456789", 413},
		{"GET", "/cache/?pattern=a'%20OR%201=1", "", 400},
		{"GET", "/cache/?pattern=%25", "", 400},
		{"GET", "/cache/?pattern=[a]", "", 400},
		{"PUT", "/cache/k1", "12345678", 200},
		{"PUT", "/cache/k2", "12345678", 200},
		{"PUT", "/cache/k3", "12345678", 200},
		{"PUT", "/cache/k4", "12345678", 507}, // the node's cache is full
		{"POST", "/cache/k1", "x", 405},
	} {
		if status, body := call(t, s, progA, tc.method, tc.path, []byte(tc.body)); status != tc.status {
			t.Errorf("%s %.60s: %d %q, want %d", tc.method, tc.path, status, body, tc.status)
		}
	}
}

func TestProxy(t *testing.T) {
	core := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/v0/messages.json":
			w.Header().Set("Content-Type", "application/json")
			w.Write([]byte(`{"messages":[],"q":"` + r.URL.RawQuery + `"}`))
		case "/huge":
			w.Write(make([]byte, guest.MaxAPIAnswer+1))
		default:
			http.NotFound(w, r)
		}
	}))
	defer core.Close()
	s := newService(t, Options{APIServer: core.URL})
	for _, tc := range []struct {
		method, path string
		status       int
		want         string
	}{
		{"GET", "/api/v0/messages.json?hashes=ab", 200, `{"messages":[],"q":"hashes=ab"}`},
		{"GET", "/nope", 404, ""},
		{"GET", "/huge", 502, ""},
		{"POST", "/api/v0/messages", 405, ""},
		{"POST", "/api/v0/ipfs/pubsub/pub", 403, ""},
		{"GET", "/a/../../x", 400, ""},
		{"GET", "//evil.example/x", 400, ""},
	} {
		status, body := call(t, s, progA, tc.method, tc.path, nil)
		if status != tc.status || (tc.want != "" && body != tc.want) {
			t.Errorf("%s %s: %d %.80q, want %d %q", tc.method, tc.path, status, body, tc.status, tc.want)
		}
	}
	if status, _ := call(t, newService(t, Options{}), progA, "GET", "/api/v0/messages.json", nil); status != 503 {
		t.Errorf("no API server: %d", status)
	}
}

func TestSign(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "guest_api_key")
	key, err := LoadKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := LoadKey(keyFile); err != nil || hex.EncodeToString(again.Serialize()) != hex.EncodeToString(key.Serialize()) {
		t.Fatalf("the key changed on reload: %v", err)
	}
	if st, _ := os.Stat(keyFile); st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v", st.Mode())
	}
	s := newService(t, Options{Key: key})
	addr := string(auth.AddressOf(key.PubKey()))
	status, body := call(t, s, progA, "GET", "/properties", nil)
	var props map[string]string
	if status != 200 || json.Unmarshal([]byte(body), &props) != nil || props["address"] != addr || props["chain"] != "ETH" ||
		props["curve"] != "secp256k1" || !strings.HasPrefix(props["public_key"], "0x02") && !strings.HasPrefix(props["public_key"], "0x03") {
		t.Errorf("properties: %d %s", status, body)
	}
	msg := func(address, sender string) []byte {
		content, _ := json.Marshal(map[string]any{"address": address, "time": 1})
		b, _ := json.Marshal(map[string]any{"chain": "ETH", "sender": sender, "type": "POST", "item_hash": "abc", "item_content": string(content)})
		return b
	}
	status, body = call(t, s, progA, "POST", "/sign", msg(string(progA), addr))
	var signed map[string]any
	if status != 200 || json.Unmarshal([]byte(body), &signed) != nil {
		t.Fatalf("sign: %d %s", status, body)
	}
	sig, _ := hex.DecodeString(strings.TrimPrefix(signed["signature"].(string), "0x"))
	if got, err := auth.RecoverPersonalSign([]byte("ETH\n"+addr+"\nPOST\nabc"), sig); err != nil || string(got) != addr {
		t.Errorf("the signature recovers %s %v, want %s", got, err, addr)
	}
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"as another program", msg(string(progB), addr)},
		{"for another sender", msg(string(progA), "0x0000000000000000000000000000000000000001")},
		{"not JSON", []byte("{")},
		{"no item_content", []byte(`{"chain":"ETH"}`)},
	} {
		if status, body := call(t, s, progA, "POST", "/sign", tc.body); status != 400 {
			t.Errorf("%s: %d %s", tc.name, status, body)
		}
	}
}
