// Package alephsdk is a test copy of the Aleph SDKs' VM client signing
// (aleph-sdk-python's VmClient, aleph-sdk-ts's VmClient), written from
// their source and sharing no code with the node's verifier or the CLI's
// signer: tests use it to show that what the SDKs send is accepted.
package alephsdk

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/decred/dcrd/dcrec/secp256k1/v4"
	secpecdsa "github.com/decred/dcrd/dcrec/secp256k1/v4/ecdsa"
	"github.com/mr-tron/base58"
	"golang.org/x/crypto/sha3"
)

// Wallet is an SDK account.
type Wallet interface {
	Address() string
	Chain() string // "ETH" or "SOL"
	// SignRaw is the account's sign_raw.
	SignRaw(buf []byte) []byte
}

// ETH is an Ethereum account; sign_raw is personal_sign of the buffer.
type ETH struct{ Key *secp256k1.PrivateKey }

// NewETH reads a hex private key.
func NewETH(hexKey string) ETH {
	raw, err := hex.DecodeString(strings.TrimPrefix(hexKey, "0x"))
	if err != nil || len(raw) != 32 {
		panic("alephsdk: bad Ethereum key")
	}
	return ETH{Key: secp256k1.PrivKeyFromBytes(raw)}
}

func keccak(parts ...[]byte) []byte {
	h := sha3.NewLegacyKeccak256()
	for _, p := range parts {
		h.Write(p)
	}
	return h.Sum(nil)
}

// Address is the EIP-55 checksummed address, as eth_account gives it.
func (e ETH) Address() string {
	pub := e.Key.PubKey().SerializeUncompressed()
	lower := hex.EncodeToString(keccak(pub[1:])[12:])
	sum := hex.EncodeToString(keccak([]byte(lower)))
	out := []byte(lower)
	for i := range out {
		if out[i] >= 'a' && sum[i] >= '8' {
			out[i] -= 'a' - 'A'
		}
	}
	return "0x" + string(out)
}

func (ETH) Chain() string { return "ETH" }

// SignRaw signs encode_defunct(text=buf): the EIP-191 personal message.
func (e ETH) SignRaw(buf []byte) []byte {
	digest := keccak([]byte("\x19Ethereum Signed Message:\n"+strconv.Itoa(len(buf))), buf)
	c := secpecdsa.SignCompact(e.Key, digest, false)
	return append(append([]byte{}, c[1:]...), c[0])
}

// SOL is a Solana account; sign_raw is ed25519 of the buffer.
type SOL struct{ Key ed25519.PrivateKey }

// NewSOL makes the account of a 32-byte seed.
func NewSOL(seed []byte) SOL { return SOL{Key: ed25519.NewKeyFromSeed(seed)} }

func (s SOL) Address() string         { return base58.Encode(s.Key.Public().(ed25519.PublicKey)) }
func (SOL) Chain() string             { return "SOL" }
func (s SOL) SignRaw(b []byte) []byte { return ed25519.Sign(s.Key, b) }

// Flavour picks which SDK is copied.
type Flavour int

const (
	// Python is aleph-sdk-python: json.dumps with its spaces, isoformat()
	// times with microseconds, jwcrypto's JWK.
	Python Flavour = iota
	// TypeScript is aleph-sdk-ts: JSON.stringify, toISOString()
	// (milliseconds), WebCrypto's JWK, and sender and content fields.
	TypeScript
)

// Client is the SDK's VmClient for one node.
type Client struct {
	Wallet  Wallet
	NodeURL string
	Flavour Flavour
	// Now is the clock (utcnow); nil is the real one.
	Now func() time.Time
	// KeyLifetime is how long the signed key is valid (a day in both
	// SDKs).
	KeyLifetime time.Duration
	// KeyDomain, when set, replaces the node's domain in the signed key
	// only.
	KeyDomain string

	eph    *ecdsa.PrivateKey
	header string
}

func (c *Client) now() time.Time {
	if c.Now != nil {
		return c.Now().UTC()
	}
	return time.Now().UTC()
}

// Domain is the node URL's host name, as both SDKs take it.
func (c *Client) Domain() string {
	u, err := url.Parse(c.NodeURL)
	if err != nil {
		panic(err)
	}
	return u.Hostname()
}

// dumps writes a JSON object with its keys in the given order, values
// []byte being JSON already, with the separators of the SDK's language.
func dumps(comma, colon string, kv ...any) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for i := 0; i < len(kv); i += 2 {
		if i > 0 {
			b.WriteString(comma)
		}
		k, _ := json.Marshal(kv[i])
		b.Write(k)
		b.WriteString(colon)
		if raw, ok := kv[i+1].([]byte); ok {
			b.Write(raw)
		} else {
			enc, _ := json.Marshal(kv[i+1])
			b.Write(enc)
		}
	}
	b.WriteByte('}')
	return b.Bytes()
}

// pyDumps writes JSON as Python's json.dumps: ", " and ": " separators.
func pyDumps(kv ...any) []byte { return dumps(", ", ": ", kv...) }

// jsStringify writes JSON as JSON.stringify: no spaces.
func jsStringify(kv ...any) []byte { return dumps(",", ":", kv...) }

func (c *Client) isoTime(t time.Time) string {
	if c.Flavour == TypeScript {
		return t.Format("2006-01-02T15:04:05.000Z")
	}
	// Python's isoformat() drops the fraction when it is zero.
	s := t.Format("2006-01-02T15:04:05")
	if us := t.Nanosecond() / 1000; us != 0 {
		s += fmt.Sprintf(".%06d", us)
	}
	return s + "Z"
}

func (c *Client) dumps(kv ...any) []byte {
	if c.Flavour == TypeScript {
		return jsStringify(kv...)
	}
	return pyDumps(kv...)
}

// PubKeyHeader builds X-SignedPubKey once, as the SDKs cache it.
func (c *Client) PubKeyHeader() string {
	if c.header != "" {
		return c.header
	}
	var err error
	if c.eph, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		panic(err)
	}
	x := base64.RawURLEncoding.EncodeToString(c.eph.PublicKey.X.FillBytes(make([]byte, 32)))
	y := base64.RawURLEncoding.EncodeToString(c.eph.PublicKey.Y.FillBytes(make([]byte, 32)))
	var jwk []byte
	if c.Flavour == TypeScript {
		jwk = jsStringify("crv", "P-256", "ext", true, "key_ops", []string{"verify"}, "kty", "EC", "x", x, "y", y)
	} else {
		jwk = pyDumps("crv", "P-256", "kty", "EC", "x", x, "y", y)
	}
	lifetime := c.KeyLifetime
	if lifetime == 0 {
		lifetime = 24 * time.Hour
	}
	domain := c.Domain()
	if c.KeyDomain != "" {
		domain = c.KeyDomain
	}
	expires := c.isoTime(c.now().Add(lifetime))
	var payload []byte
	if c.Flavour == TypeScript {
		payload = jsStringify("pubkey", jwk, "alg", "ECDSA", "domain", domain, "address", c.Wallet.Address(),
			"chain", c.Wallet.Chain(), "expires", expires)
	} else {
		payload = pyDumps("pubkey", jwk, "alg", "ECDSA", "domain", domain, "address", c.Wallet.Address(),
			"expires", expires, "chain", c.Wallet.Chain())
	}
	hexPayload := hex.EncodeToString(payload)
	// Solana wallets sign the hex text; Ethereum ones the JSON's bytes.
	buf := payload
	if c.Wallet.Chain() == "SOL" {
		buf = []byte(hexPayload)
	}
	sig := "0x" + hex.EncodeToString(c.Wallet.SignRaw(buf))
	c.header = string(c.dumps("sender", c.Wallet.Address(), "payload", hexPayload, "signature", sig,
		"content", c.dumps("domain", c.Domain())))
	return c.header
}

// Operation builds X-SignedOperation for method on path.
func (c *Client) Operation(method, path string) string {
	c.PubKeyHeader()
	payload := c.dumps("time", c.isoTime(c.now()), "method", strings.ToUpper(method), "path", path, "domain", c.Domain())
	digest := sha256.Sum256(payload)
	r, s, err := ecdsa.Sign(rand.Reader, c.eph, digest[:])
	if err != nil {
		panic(err)
	}
	sig := hex.EncodeToString(append(r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))...))
	if c.Flavour == TypeScript {
		return string(jsStringify("sender", c.Wallet.Address(), "payload", hex.EncodeToString(payload), "signature", sig,
			"content", jsStringify("domain", c.Domain())))
	}
	return string(pyDumps("payload", hex.EncodeToString(payload), "signature", sig))
}

// Request builds the SDK's perform_operation request for a VM.
func (c *Client) Request(method, vmID, operation string) *http.Request {
	path := "/control/machine/" + vmID + "/" + operation
	req, err := http.NewRequest(method, strings.TrimRight(c.NodeURL, "/")+path, nil)
	if err != nil {
		panic(err)
	}
	req.Header.Set("X-SignedPubKey", c.PubKeyHeader())
	req.Header.Set("X-SignedOperation", c.Operation(method, path))
	return req
}

// AuthFrame is get_logs' first websocket frame.
func (c *Client) AuthFrame(vmID string) []byte {
	path := "/control/machine/" + vmID + "/stream_logs"
	op := c.Operation("get", path)
	return c.dumps("auth", c.dumps("X-SignedPubKey", []byte(c.PubKeyHeader()), "X-SignedOperation", []byte(op)))
}

// HighS turns an Ethereum signature r || s || v into its high-s twin,
// which eth_account also accepts.
func HighS(sig []byte) []byte {
	n := secp256k1.S256().N
	s := new(big.Int).SetBytes(sig[32:64])
	out := append([]byte{}, sig...)
	new(big.Int).Sub(n, s).FillBytes(out[32:64])
	if out[64] >= 27 {
		out[64] = 55 - out[64] // 27 <-> 28
	} else {
		out[64] ^= 1
	}
	return out
}
