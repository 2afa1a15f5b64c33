package auth

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mr-tron/base58"
)

// The owner scheme (the reference's "operator authentication"): a wallet
// signs an ephemeral P-256 public key (X-SignedPubKey), and that key signs
// each operation (X-SignedOperation) with ES256. Browsers cannot set
// headers on a websocket, so stream_logs carries both in its first frame.

// The wallet chains the owner scheme accepts.
const (
	ChainETH = "ETH"
	ChainSOL = "SOL"
)

// Identity is a wallet authenticated by the owner scheme.
type Identity struct {
	// Address is the wallet's address as it signed it: 0x hex for ETH,
	// base58 for SOL.
	Address string
	Chain   string
}

// Is reports whether the identity is the wallet addr: Ethereum addresses
// compare in any case, Solana's base58 exactly.
func (id Identity) Is(addr string) bool {
	if id.Chain == ChainSOL {
		return id.Address == addr
	}
	return strings.EqualFold(id.Address, addr)
}

// CheckWalletAddress checks that addr is a wallet address the owner
// scheme can authenticate: Ethereum (0x and 40 hex digits) or Solana
// (base58 of a 32-byte key).
func CheckWalletAddress(addr string) error {
	if strings.HasPrefix(addr, "0x") {
		_, err := ParseAddress(addr)
		return err
	}
	if pub, err := base58.Decode(addr); err != nil || len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("address %q is neither Ethereum nor Solana", addr)
	}
	return nil
}

// OwnerOptions configure Owner.
type OwnerOptions struct {
	// Domain is the node's DOMAIN_NAME, which every signed key and
	// operation must name.
	Domain string
	// MaxSkew bounds the distance between an operation's time and now
	// (the reference's 2 minutes when zero).
	MaxSkew time.Duration
	// MaxKeys bounds the verified public keys kept (1024 when zero).
	MaxKeys int
	// MaxOperations bounds the operations remembered against replay in
	// memory (65536 when zero).
	MaxOperations int
	Now           func() time.Time
	// DB is the node's database, which keeps the operations accepted (with
	// the scheduler's calls) so that a restarted node refuses their replays
	// too; nil keeps them in memory.
	DB *sql.DB
}

// Owner verifies the owner scheme's headers and websocket frames.
type Owner struct {
	opts OwnerOptions

	mu      sync.Mutex
	keys    map[[32]byte]*verifiedKey // by hash of the signed key's payload and signature
	replays replays                   // operations seen, until they are stale
}

type verifiedKey struct {
	id      Identity
	pub     *ecdsa.PublicKey
	expires time.Time
}

// NewOwner returns the verifier.
func NewOwner(o OwnerOptions) *Owner {
	if o.MaxSkew == 0 {
		o.MaxSkew = 2 * time.Minute
	}
	if o.MaxKeys == 0 {
		o.MaxKeys = 1024
	}
	if o.MaxOperations == 0 {
		o.MaxOperations = 1 << 16
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	var r replays = newMemoryReplays(o.MaxOperations)
	if o.DB != nil {
		r = dbReplays{o.DB}
	}
	return &Owner{opts: o, keys: map[[32]byte]*verifiedKey{}, replays: r}
}

// HasCredentials reports whether r carries the owner scheme's headers
// (rather than the scheduler's).
func HasCredentials(r *http.Request) bool {
	return r.Header.Get("X-SignedPubKey") != "" || r.Header.Get("X-SignedOperation") != ""
}

func badRequest(reason string) *Error { return &Error{Status: http.StatusBadRequest, Reason: reason} }
func denied(reason string) *Error     { return &Error{Status: http.StatusUnauthorized, Reason: reason} }

// Verify authenticates a request by its X-SignedPubKey and
// X-SignedOperation headers, answering as the reference: 400 for a
// malformed header, 401 for an expired key, a bad signature or an
// operation signed for another domain, path or method.
func (o *Owner) Verify(r *http.Request) (Identity, error) {
	pk := r.Header.Get("X-SignedPubKey")
	if pk == "" {
		return Identity{}, badRequest("Missing X-SignedPubKey header")
	}
	if !json.Valid([]byte(pk)) {
		return Identity{}, badRequest("Invalid X-SignedPubKey format")
	}
	key, err := o.signedKey([]byte(pk))
	if err != nil {
		return Identity{}, err
	}
	op := r.Header.Get("X-SignedOperation")
	if op == "" {
		return Identity{}, badRequest("Missing X-SignedOperation header")
	}
	return o.operation(r.Context(), key, []byte(op), r.Method, r.URL.Path)
}

// Credentials is the "auth" object of a websocket's first frame: the two
// headers as JSON objects.
type Credentials struct {
	PubKey    json.RawMessage `json:"X-SignedPubKey"`
	Operation json.RawMessage `json:"X-SignedOperation"`
}

// VerifyCredentials authenticates a websocket's first frame. The SDKs sign
// the stream_logs path with GET, which is checked like a request's.
func (o *Owner) VerifyCredentials(ctx context.Context, c Credentials, method, path string) (Identity, error) {
	if len(c.PubKey) == 0 {
		return Identity{}, badRequest("Missing X-SignedPubKey header")
	}
	if len(c.Operation) == 0 {
		return Identity{}, badRequest("Missing X-SignedOperation header")
	}
	key, err := o.signedKey(c.PubKey)
	if err != nil {
		return Identity{}, err
	}
	return o.operation(ctx, key, c.Operation, method, path)
}

// signedHeader is the shape of both headers; SDKs add sender and content,
// which carry nothing verified.
type signedHeader struct {
	Payload   *string `json:"payload"`
	Signature *string `json:"signature"`
}

func decodeHex(s string) ([]byte, error) {
	return hex.DecodeString(strings.TrimPrefix(s, "0x"))
}

// keyPayload is what the wallet signs.
type keyPayload struct {
	PubKey  *jwk    `json:"pubkey"`
	Alg     string  `json:"alg"`
	Domain  *string `json:"domain"`
	Address *string `json:"address"`
	Expires *string `json:"expires"`
	Chain   *string `json:"chain"`
}

type jwk struct {
	Kty    string   `json:"kty"`
	Crv    string   `json:"crv"`
	X      string   `json:"x"`
	Y      string   `json:"y"`
	Use    string   `json:"use"`
	KeyOps []string `json:"key_ops"`
}

// signedKey verifies an X-SignedPubKey, or finds it verified already.
func (o *Owner) signedKey(raw []byte) (*verifiedKey, error) {
	invalid := badRequest("Invalid X-SignedPubKey data")
	var h signedHeader
	if err := json.Unmarshal(raw, &h); err != nil {
		if !json.Valid(raw) {
			return nil, badRequest("Invalid X-SignedPubKey format")
		}
		return nil, invalid
	}
	if h.Payload == nil || h.Signature == nil {
		return nil, invalid
	}
	payload, err := decodeHex(*h.Payload)
	if err != nil {
		return nil, invalid
	}
	sig, err := decodeHex(*h.Signature)
	if err != nil {
		return nil, invalid
	}
	now := o.opts.Now()
	cacheKey := sha256.Sum256(append(append(append([]byte{}, payload...), 0), sig...))
	o.mu.Lock()
	cached := o.keys[cacheKey]
	o.mu.Unlock()
	if cached != nil {
		if !cached.expires.After(now) {
			return nil, denied("Token expired")
		}
		return cached, nil
	}

	var p keyPayload
	if err := json.Unmarshal(payload, &p); err != nil || p.PubKey == nil || p.Address == nil || p.Expires == nil {
		return nil, invalid
	}
	expires, err := parseTime(*p.Expires)
	if err != nil {
		return nil, invalid
	}
	if !expires.After(now) {
		return nil, denied("Token expired")
	}
	chain := ChainETH
	if p.Chain != nil {
		chain = *p.Chain
	}
	id := Identity{Address: *p.Address, Chain: chain}
	switch chain {
	case ChainETH:
		if !verifyETH(payload, sig, id.Address) {
			return nil, denied("Invalid signature")
		}
	case ChainSOL:
		if !verifySOL(payload, sig, id.Address) {
			return nil, denied("Invalid signature")
		}
	default:
		return nil, invalid
	}
	// The reference does not check the key's domain; a key signed for
	// another node is refused here too.
	if p.Domain == nil || !strings.EqualFold(*p.Domain, o.opts.Domain) {
		signed := ""
		if p.Domain != nil {
			signed = *p.Domain
		}
		return nil, denied(fmt.Sprintf("Invalid domain: Signed: '%s' != Request: '%s'", signed, o.opts.Domain))
	}
	pub, err := p.PubKey.publicKey()
	if err != nil {
		return nil, invalid
	}
	key := &verifiedKey{id: id, pub: pub, expires: expires}
	o.remember(cacheKey, key, now)
	return key, nil
}

// remember keeps a verified key until it expires, within the bound: the
// expired go first, then whatever the map yields.
func (o *Owner) remember(k [32]byte, key *verifiedKey, now time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.keys) >= o.opts.MaxKeys {
		for h, v := range o.keys {
			if !v.expires.After(now) {
				delete(o.keys, h)
			}
		}
	}
	for h := range o.keys {
		if len(o.keys) < o.opts.MaxKeys {
			break
		}
		delete(o.keys, h)
	}
	o.keys[k] = key
}

// operationPayload is what the ephemeral key signs.
type operationPayload struct {
	Time   json.RawMessage `json:"time"`
	Method *string         `json:"method"`
	Domain *string         `json:"domain"`
	Path   *string         `json:"path"`
}

// operation verifies an X-SignedOperation against the verified key and
// the request it came with.
func (o *Owner) operation(ctx context.Context, key *verifiedKey, raw []byte, method, path string) (Identity, error) {
	invalid := badRequest("Invalid X-SignedOperation fields")
	var h signedHeader
	if err := json.Unmarshal(raw, &h); err != nil || h.Payload == nil || h.Signature == nil {
		return Identity{}, invalid
	}
	payload, err := decodeHex(*h.Payload)
	if err != nil {
		return Identity{}, invalid
	}
	sig, err := decodeHex(*h.Signature)
	if err != nil {
		return Identity{}, invalid
	}
	var p operationPayload
	if err := json.Unmarshal(payload, &p); err != nil || p.Time == nil || p.Method == nil || p.Domain == nil || p.Path == nil {
		return Identity{}, invalid
	}
	switch *p.Method {
	case http.MethodGet, http.MethodPost, http.MethodDelete:
	default:
		return Identity{}, invalid
	}
	at, err := parseOperationTime(p.Time)
	if err != nil {
		return Identity{}, invalid
	}
	now := o.opts.Now()
	// A stale time is a validation error in the reference, hence 400.
	if at.Before(now.Add(-o.opts.MaxSkew)) || at.After(now.Add(o.opts.MaxSkew)) {
		return Identity{}, invalid
	}
	if !strings.EqualFold(*p.Domain, o.opts.Domain) {
		return Identity{}, denied(fmt.Sprintf("Invalid domain: Signed: '%s' != Request: '%s'", *p.Domain, o.opts.Domain))
	}
	if *p.Path != path {
		return Identity{}, denied(fmt.Sprintf("Invalid path. Signed: '%s' !=  requested path: '%s'", *p.Path, path))
	}
	if *p.Method != method {
		return Identity{}, denied(fmt.Sprintf("Invalid method. Signed: '%s' !=  request:'%s", *p.Method, method))
	}
	if !verifyES256(key.pub, payload, sig) {
		return Identity{}, denied("Signature could not verified")
	}
	fresh, err := o.firstUse(ctx, key, payload, at, now)
	if err != nil {
		return Identity{}, replayCacheError(err)
	}
	if !fresh {
		return Identity{}, denied("Signed operation already used")
	}
	return key.id, nil
}

// firstUse remembers an operation until it is stale and refuses it the
// second time: the reference does not, and a reinstall replayed within its
// two minutes would wipe the disk again. The payload is hashed rather than
// the signature, which ECDSA makes malleable.
func (o *Owner) firstUse(ctx context.Context, key *verifiedKey, payload []byte, at, now time.Time) (bool, error) {
	h := sha256.New()
	h.Write(key.pub.X.Bytes())
	h.Write(key.pub.Y.Bytes())
	h.Write(payload)
	return o.replays.remember(context.WithoutCancel(ctx), h.Sum(nil), now, at.Add(o.opts.MaxSkew))
}

// parseTime reads an ISO 8601 time as the SDKs write it: Python's
// isoformat()+"Z" (microseconds or none) and JavaScript's toISOString(). A
// time without a zone is taken as UTC.
func parseTime(s string) (time.Time, error) {
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05.999999999", "2006-01-02 15:04:05.999999999Z07:00", "2006-01-02 15:04:05.999999999"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("time %q is not ISO 8601", s)
}

// parseOperationTime reads an operation's time: an ISO 8601 string, or
// a number of seconds since the epoch, as the reference's model accepts.
func parseOperationTime(raw json.RawMessage) (time.Time, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		if t, err := parseTime(s); err == nil {
			return t, nil
		}
		raw = json.RawMessage(s)
	}
	f, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || f < 0 || f > 1e11 {
		return time.Time{}, errors.New("time is neither ISO 8601 nor seconds since the epoch")
	}
	sec := int64(f)
	return time.Unix(sec, int64((f-float64(sec))*1e9)), nil
}

// verifyETH checks an EIP-191 personal_sign of the payload's bytes by
// address. The reference (eth_account) takes high-s signatures too, so
// they are taken here: a twin signature names the same signer.
func verifyETH(payload, sig []byte, address string) bool {
	addr, err := recoverPersonalSign(payload, sig, false)
	return err == nil && strings.EqualFold(string(addr), address)
}

// verifySOL checks an ed25519 signature by a Solana address (base58 of the
// public key) of the payload's hex, which is what Solana wallets sign.
func verifySOL(payload, sig []byte, address string) bool {
	pub, err := base58.Decode(address)
	if err != nil || len(pub) != ed25519.PublicKeySize || len(sig) != ed25519.SignatureSize {
		return false
	}
	return ed25519.Verify(ed25519.PublicKey(pub), []byte(hex.EncodeToString(payload)), sig)
}

// publicKey reads an EC P-256 JWK as WebCrypto and jwcrypto export it.
func (k *jwk) publicKey() (*ecdsa.PublicKey, error) {
	if k.Kty != "EC" || k.Crv != "P-256" {
		return nil, fmt.Errorf("key is %s %s, not EC P-256", k.Kty, k.Crv)
	}
	if k.Use != "" && k.Use != "sig" {
		return nil, fmt.Errorf("key is for %q, not signatures", k.Use)
	}
	if k.KeyOps != nil && !slices.Contains(k.KeyOps, "verify") {
		return nil, errors.New("key_ops does not allow verify")
	}
	x, err1 := base64.RawURLEncoding.DecodeString(k.X)
	y, err2 := base64.RawURLEncoding.DecodeString(k.Y)
	if err1 != nil || err2 != nil || len(x) != 32 || len(y) != 32 {
		return nil, errors.New("key coordinates are not 32 bytes of base64url")
	}
	point := append(append([]byte{4}, x...), y...)
	return ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
}

// verifyES256 checks a raw r || s ES256 signature.
func verifyES256(pub *ecdsa.PublicKey, payload, sig []byte) bool {
	if len(sig) != 64 {
		return false
	}
	digest := sha256.Sum256(payload)
	r := new(big.Int).SetBytes(sig[:32])
	s := new(big.Int).SetBytes(sig[32:])
	return ecdsa.Verify(pub, digest[:], r, s)
}
