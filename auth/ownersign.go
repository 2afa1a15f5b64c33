package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/decred/dcrd/dcrec/secp256k1/v4"
	secpecdsa "github.com/decred/dcrd/dcrec/secp256k1/v4/ecdsa"
)

// KeyLifetime is how long a signed ephemeral key is valid, as the SDKs
// make it.
const KeyLifetime = 24 * time.Hour

// OwnerSigner signs calls in the owner scheme for an Ethereum wallet, as
// the Aleph SDKs do: one ephemeral P-256 key, whose public key the wallet
// signs once (X-SignedPubKey), and which signs each operation
// (X-SignedOperation).
type OwnerSigner struct {
	wallet *secp256k1.PrivateKey
	domain string
	now    func() time.Time

	mu      sync.Mutex
	eph     *ecdsa.PrivateKey
	header  string
	expires time.Time
}

// ParseWalletKey reads an Ethereum private key written as hex, with or
// without 0x, as wallets export it.
func ParseWalletKey(text string) (*secp256k1.PrivateKey, error) {
	raw, err := hex.DecodeString(strings.TrimPrefix(strings.TrimSpace(text), "0x"))
	if err != nil || len(raw) != 32 {
		return nil, fmt.Errorf("wallet key: want 64 hex digits (an Ethereum private key)")
	}
	var k secp256k1.ModNScalar
	if overflow := k.SetByteSlice(raw); overflow || k.IsZero() {
		return nil, fmt.Errorf("wallet key: not a valid secp256k1 private key")
	}
	return secp256k1.NewPrivateKey(&k), nil
}

// NewOwnerSigner signs for wallet towards the node whose DOMAIN_NAME is
// domain (the host name of its URL, as the SDKs take it).
func NewOwnerSigner(wallet *secp256k1.PrivateKey, domain string, now func() time.Time) *OwnerSigner {
	if now == nil {
		now = time.Now
	}
	return &OwnerSigner{wallet: wallet, domain: domain, now: now}
}

// Address is the wallet's address.
func (s *OwnerSigner) Address() string { return string(AddressOf(s.wallet.PubKey())) }

// Headers returns the two headers of a call of method on path.
func (s *OwnerSigner) Headers(method, path string) (http.Header, error) {
	pub, op, err := s.sign(method, path)
	if err != nil {
		return nil, err
	}
	h := http.Header{}
	h.Set("X-SignedPubKey", pub)
	h.Set("X-SignedOperation", op)
	return h, nil
}

// AuthFrame returns the first frame of a stream_logs websocket on path.
func (s *OwnerSigner) AuthFrame(path string) ([]byte, error) {
	pub, op, err := s.sign(http.MethodGet, path)
	if err != nil {
		return nil, err
	}
	return json.Marshal(map[string]any{"auth": map[string]json.RawMessage{
		"X-SignedPubKey": json.RawMessage(pub), "X-SignedOperation": json.RawMessage(op),
	}})
}

func (s *OwnerSigner) sign(method, path string) (pubHeader, opHeader string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now().UTC()
	if s.header == "" || now.Add(time.Minute).After(s.expires) {
		if err := s.newKey(now); err != nil {
			return "", "", err
		}
	}
	op, err := json.Marshal(struct {
		Time   string `json:"time"`
		Method string `json:"method"`
		Path   string `json:"path"`
		Domain string `json:"domain"`
	}{now.Format("2006-01-02T15:04:05.000000Z"), strings.ToUpper(method), path, s.domain})
	if err != nil {
		return "", "", err
	}
	digest := sha256.Sum256(op)
	r, ss, err := ecdsa.Sign(rand.Reader, s.eph, digest[:])
	if err != nil {
		return "", "", fmt.Errorf("sign operation: %w", err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	ss.FillBytes(sig[32:])
	opJSON, err := json.Marshal(map[string]string{"payload": hex.EncodeToString(op), "signature": hex.EncodeToString(sig)})
	return s.header, string(opJSON), err
}

// newKey makes the ephemeral key and has the wallet sign its public key.
func (s *OwnerSigner) newKey(now time.Time) error {
	eph, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("ephemeral key: %w", err)
	}
	point, err := eph.PublicKey.Bytes() // 0x04 || x || y
	if err != nil {
		return err
	}
	expires := now.Add(KeyLifetime)
	payload, err := json.Marshal(struct {
		PubKey  map[string]string `json:"pubkey"`
		Alg     string            `json:"alg"`
		Domain  string            `json:"domain"`
		Address string            `json:"address"`
		Expires string            `json:"expires"`
		Chain   string            `json:"chain"`
	}{
		PubKey: map[string]string{"crv": "P-256", "kty": "EC",
			"x": base64.RawURLEncoding.EncodeToString(point[1:33]), "y": base64.RawURLEncoding.EncodeToString(point[33:])},
		Alg: "ECDSA", Domain: s.domain, Address: s.Address(), Expires: expires.Format("2006-01-02T15:04:05.000000Z"), Chain: ChainETH,
	})
	if err != nil {
		return err
	}
	// The wallet signs the payload's bytes with personal_sign.
	compact := secpecdsa.SignCompact(s.wallet, PersonalSignHash(payload), false) // v || r || s
	sig := append(append([]byte{}, compact[1:]...), compact[0])
	header, err := json.Marshal(map[string]any{
		"sender": s.Address(), "payload": hex.EncodeToString(payload), "signature": "0x" + hex.EncodeToString(sig),
		"content": map[string]string{"domain": s.domain},
	})
	if err != nil {
		return err
	}
	s.eph, s.header, s.expires = eph, string(header), expires
	return nil
}
