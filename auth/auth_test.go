package auth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/decred/dcrd/dcrec/secp256k1/v4"
	"github.com/decred/dcrd/dcrec/secp256k1/v4/ecdsa"

	"github.com/alephvm/alephvm/db"
)

// The web3.js documentation's example: accounts.sign("Some data", key).
const (
	web3Key     = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
	web3Address = "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23"
	web3Sig     = "b91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd6007e74cd82e037b800186422fc2da167c747ef045e5d18a5f5d4300f8e1a0291c"
)

func TestKnownAnswers(t *testing.T) {
	sig, _ := hex.DecodeString(web3Sig)
	addr, err := RecoverPersonalSign([]byte("Some data"), sig)
	if err != nil || addr != web3Address {
		t.Errorf("recovered %s, %v", addr, err)
	}
	key, _ := hex.DecodeString(web3Key)
	if got := AddressOf(secp256k1.PrivKeyFromBytes(key).PubKey()); got != web3Address {
		t.Errorf("address %s", got)
	}
	for _, s := range []string{"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359", DefaultSigner} {
		if _, err := ParseAddress(s); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	if _, err := ParseAddress("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"); err == nil {
		t.Error("bad checksum accepted")
	}
}

type signer struct{ key *secp256k1.PrivateKey }

func newSigner(t *testing.T) signer {
	k, err := secp256k1.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return signer{k}
}

func (s signer) address() string { return string(AddressOf(s.key.PubKey())) }

// sign returns r || s || v as wallets produce it.
func (s signer) sign(msg []byte) []byte {
	c := ecdsa.SignCompact(s.key, PersonalSignHash(msg), false)
	return append(c[1:65:65], c[0])
}

func (s signer) request(t *testing.T, method, path string, body []byte, iat int64, mutate func(p map[string]any)) *http.Request {
	sum := sha256.Sum256(body)
	p := map[string]any{"method": method, "path": path, "body_sha256": hex.EncodeToString(sum[:]), "iat": iat}
	if mutate != nil {
		mutate(p)
	}
	payload, _ := json.Marshal(p)
	req := httptest.NewRequest(method, path, bytes.NewReader(body))
	req.Header.Set("Authorization", fmt.Sprintf("Aleph-EIP191-V1 sig=0x%x,payload=0x%x", s.sign(payload), payload))
	return req
}

func TestAllocationAuth(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	good := newSigner(t)
	other := newSigner(t)
	tokenSum := sha256.Sum256([]byte("test"))
	a, err := NewAllocation(AllocationOptions{TokenHash: hex.EncodeToString(tokenSum[:]), Signers: []string{good.address()}, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"persistent_vms":[],"instances":[]}`)
	const path = "/control/allocations"
	iat := now.Unix()

	replayed := good.request(t, "POST", path, body, iat-1, nil)
	replayedAgain := replayed.Clone(replayed.Context())
	replayedAgain.Body = readerCloser{bytes.NewReader(body)}

	highS := good.request(t, "POST", path, body, iat, nil)
	{ // flip s to n-s and v: same signer, the malleable twin
		var params struct{ sig, payload string }
		fmt.Sscanf(highS.Header.Get("Authorization"), "Aleph-EIP191-V1 sig=0x%130s", &params.sig)
		raw, _ := hex.DecodeString(params.sig[:130])
		s := new(big.Int).SetBytes(raw[32:64])
		s.Sub(secp256k1.S256().N, s)
		s.FillBytes(raw[32:64])
		raw[64] ^= 1
		h := highS.Header.Get("Authorization")
		highS.Header.Set("Authorization", h[:len("Aleph-EIP191-V1 sig=0x")]+hex.EncodeToString(raw)+h[len("Aleph-EIP191-V1 sig=0x")+130:])
	}

	withQuery := good.request(t, "POST", path, body, iat, nil)
	withQuery.URL.RawQuery = "x=1"
	legacy := httptest.NewRequest("POST", path, bytes.NewReader(body))
	legacy.Header.Set("X-Auth-Signature", "test")
	legacyWrong := httptest.NewRequest("POST", path, bytes.NewReader(body))
	legacyWrong.Header.Set("X-Auth-Signature", "nope")
	both := good.request(t, "POST", path, body, iat, func(p map[string]any) { p["path"] = "/elsewhere" })
	both.Header.Set("X-Auth-Signature", "test")
	// A body past MaxBodyBytes is too large, not a bad credential: 413,
	// as the reference's aiohttp answers it.
	huge := bytes.Repeat([]byte(" "), MaxBodyBytes+1)
	legacyHuge := httptest.NewRequest("POST", path, bytes.NewReader(huge))
	legacyHuge.Header.Set("X-Auth-Signature", "test")
	legacyHugeChunked := httptest.NewRequest("POST", path, bytes.NewReader(huge))
	legacyHugeChunked.ContentLength = -1
	legacyHugeChunked.Header.Set("X-Auth-Signature", "test")

	cases := []struct {
		name   string
		req    *http.Request
		status int // 0: accepted
	}{
		{"signed", replayed, 0},
		{"replayed", replayedAgain, 401},
		{"legacy token", legacy, 0},
		{"legacy wrong token", legacyWrong, 401},
		{"no credentials", httptest.NewRequest("POST", path, bytes.NewReader(body)), 401},
		{"unauthorized signer", other.request(t, "POST", path, body, iat, nil), 403},
		{"too old", good.request(t, "POST", path, body, iat-301, nil), 401},
		{"from the future", good.request(t, "POST", path, body, iat+301, nil), 401},
		{"other path", good.request(t, "POST", path+"/", body, iat, func(p map[string]any) { p["path"] = path }), 401},
		{"other method", good.request(t, "PUT", path, body, iat, func(p map[string]any) { p["method"] = "POST" }), 401},
		{"query string", withQuery, 401},
		{"body changed", good.request(t, "POST", path, body, iat, func(p map[string]any) { p["body_sha256"] = hex.EncodeToString(make([]byte, 32)) }), 401},
		{"iat not an integer", good.request(t, "POST", path, body, iat, func(p map[string]any) { p["iat"] = 1.8e9 + 0.5 }), 401},
		{"high s", highS, 401},
		{"signature header skips the legacy token", both, 401},
		{"signed, body too large", good.request(t, "POST", path, huge, iat, nil), 413},
		{"legacy token, body too large", legacyHuge, 413},
		{"legacy token, body too large, no length", legacyHugeChunked, 413},
	}
	for _, tc := range cases {
		got, err := a.Verify(tc.req)
		var aerr *Error
		switch {
		case tc.status == 0 && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
		case tc.status == 0 && !bytes.Equal(got, body):
			t.Errorf("%s: body %q", tc.name, got)
		case tc.status != 0 && (!errors.As(err, &aerr) || aerr.Status != tc.status):
			t.Errorf("%s: err %v, want status %d", tc.name, err, tc.status)
		}
	}
}

type readerCloser struct{ *bytes.Reader }

func (readerCloser) Close() error { return nil }

// TestReplayCacheSurvivesARestart: a signed call accepted by a node is
// refused by the same node restarted (a new verifier on the same
// database), within its time window; the records of calls whose window
// has passed are deleted.
func TestReplayCacheSurvivesARestart(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	good := newSigner(t)
	path := filepath.Join(t.TempDir(), "alephvm.sqlite3")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()
	body := []byte(`{"persistent_vms":[],"instances":[]}`)
	call := good.request(t, "POST", "/control/allocations", body, now.Unix(), nil)
	again := func() *http.Request {
		r := call.Clone(ctx)
		r.Body = readerCloser{bytes.NewReader(body)}
		return r
	}

	database, err := db.Open(ctx, path, log)
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewAllocation(AllocationOptions{Signers: []string{good.address()}, Now: clock, DB: database})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Verify(again()); err != nil {
		t.Fatalf("first call refused: %v", err)
	}
	database.Close()

	database, err = db.Open(ctx, path, log)
	if err != nil {
		t.Fatal(err)
	}
	defer database.Close()
	restarted, err := NewAllocation(AllocationOptions{Signers: []string{good.address()}, Now: clock, DB: database})
	if err != nil {
		t.Fatal(err)
	}
	var aerr *Error
	if _, err := restarted.Verify(again()); !errors.As(err, &aerr) || aerr.Status != 401 {
		t.Errorf("replay after a restart: %v, want 401", err)
	}

	// Past the window, the next accepted call deletes the old records.
	now = now.Add(10 * time.Minute)
	if _, err := restarted.Verify(good.request(t, "POST", "/control/allocations", body, now.Unix(), nil)); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := database.QueryRow(`SELECT count(*) FROM auth_replays`).Scan(&n); err != nil || n != 1 {
		t.Errorf("%d records kept (%v), want the last call's only", n, err)
	}

	// A cache that cannot be written refuses the call rather than let a
	// replay through.
	database.Close()
	if _, err := restarted.Verify(good.request(t, "POST", "/control/allocations", body, now.Unix()+1, nil)); !errors.As(err, &aerr) || aerr.Status != http.StatusServiceUnavailable {
		t.Errorf("with the database gone: %v, want 503", err)
	}
}
