// Package auth authenticates the scheduler's calls to the node: the
// reference's signed "Authorization: Aleph-EIP191-V1" scheme, replay-safe,
// and its deprecated X-Auth-Signature token.
package auth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// MaxBodyBytes bounds the body of an authenticated call, as the reference
// does.
const MaxBodyBytes = 1 << 20

// DefaultSigner is the reference's DEFAULT_ALLOCATION_SIGNERS.
const DefaultSigner = "0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A"

// Error is an authentication failure with the HTTP status to answer.
type Error struct {
	Status int
	Reason string
}

func (e *Error) Error() string { return e.Reason }

// HTTPStatus implements api.StatusError.
func (e *Error) HTTPStatus() int { return e.Status }

func unauthorized(format string, args ...any) *Error {
	return &Error{Status: http.StatusUnauthorized, Reason: "Authentication token received is invalid: " + fmt.Sprintf(format, args...)}
}

// Allocation verifies scheduler calls.
type Allocation struct {
	tokenHash []byte           // sha256 of the legacy token; nil disables it
	signers   map[Address]bool // who may sign
	maxAge    time.Duration
	now       func() time.Time
	replays   replays // accepted payload hashes, until they expire
}

// AllocationOptions configure Allocation.
type AllocationOptions struct {
	// TokenHash is the hex sha256 of the legacy X-Auth-Signature token
	// (ALLOCATION_TOKEN_HASH); empty disables the legacy scheme.
	TokenHash string
	// Signers may sign calls; empty means DefaultSigner.
	Signers []string
	// MaxAge bounds the difference between a call's iat and now.
	MaxAge time.Duration
	Now    func() time.Time
	// DB is the node's database, which keeps the payloads accepted so that
	// a restarted node refuses their replays too; nil keeps them in memory.
	DB *sql.DB
}

// NewAllocation builds the verifier.
func NewAllocation(o AllocationOptions) (*Allocation, error) {
	a := &Allocation{signers: map[Address]bool{}, maxAge: o.MaxAge, now: o.Now, replays: newMemoryReplays(1 << 16)}
	if o.DB != nil {
		a.replays = dbReplays{o.DB}
	}
	if a.maxAge == 0 {
		a.maxAge = 300 * time.Second
	}
	if a.now == nil {
		a.now = time.Now
	}
	if o.TokenHash != "" {
		h, err := hex.DecodeString(o.TokenHash)
		if err != nil || len(h) != sha256.Size {
			return nil, fmt.Errorf("allocation token hash %q: want 64 hex digits", o.TokenHash)
		}
		a.tokenHash = h
	}
	signers := o.Signers
	if len(signers) == 0 {
		signers = []string{DefaultSigner}
	}
	for _, s := range signers {
		addr, err := ParseAddress(s)
		if err != nil {
			return nil, fmt.Errorf("allocation signer: %w", err)
		}
		a.signers[addr] = true
	}
	return a, nil
}

// signedPayload is what the scheduler signs.
type signedPayload struct {
	Method     string          `json:"method"`
	Path       string          `json:"path"`
	BodySHA256 string          `json:"body_sha256"`
	IAT        json.RawMessage `json:"iat"`
}

// Verify authenticates r and returns its body, read and bounded. The body
// must be fully read to be verified, so the handler gets it from here.
func (a *Allocation) Verify(r *http.Request) ([]byte, error) {
	authz, hasAuthz := r.Header["Authorization"]
	if !hasAuthz {
		if token := r.Header.Get("X-Auth-Signature"); token != "" && a.tokenHash != nil {
			sum := sha256.Sum256([]byte(token))
			if subtle.ConstantTimeCompare(sum[:], a.tokenHash) == 1 {
				return readBody(r)
			}
		}
		return nil, unauthorized("no valid Authorization or X-Auth-Signature header")
	}
	scheme, params, _ := strings.Cut(strings.TrimSpace(authz[0]), " ")
	if !strings.EqualFold(scheme, "Aleph-EIP191-V1") {
		return nil, unauthorized("unknown scheme %q", scheme)
	}
	sig, payloadHex, err := parseParams(params)
	if err != nil {
		return nil, unauthorized("%v", err)
	}
	if r.URL.RawQuery != "" || r.URL.ForceQuery {
		return nil, unauthorized("signed calls take no query string")
	}
	if r.ContentLength < 0 {
		return nil, unauthorized("Content-Length is required")
	}
	if r.ContentLength > MaxBodyBytes {
		return nil, tooLarge()
	}
	payload, err := hex.DecodeString(strings.TrimPrefix(payloadHex, "0x"))
	if err != nil {
		return nil, unauthorized("payload is not hex")
	}
	sigBytes, err := hex.DecodeString(strings.TrimPrefix(sig, "0x"))
	if err != nil {
		return nil, unauthorized("sig is not hex")
	}
	var p signedPayload
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&p); err != nil || p.Method == "" || p.Path == "" || p.BodySHA256 == "" || p.IAT == nil {
		return nil, unauthorized("payload must be JSON with method, path, body_sha256 and iat")
	}
	var iat int64
	if err := json.Unmarshal(p.IAT, &iat); err != nil {
		return nil, unauthorized("iat must be a JSON integer")
	}
	if age := a.now().Sub(time.Unix(iat, 0)); age > a.maxAge || age < -a.maxAge {
		return nil, unauthorized("iat is %s away from now, more than %s", age.Round(time.Second), a.maxAge)
	}
	if p.Method != r.Method || p.Path != r.URL.Path {
		return nil, unauthorized("signed for %s %s, not %s %s", p.Method, p.Path, r.Method, r.URL.Path)
	}
	signer, err := RecoverPersonalSign(payload, sigBytes)
	if err != nil {
		return nil, unauthorized("%v", err)
	}
	if !a.signers[signer] {
		return nil, &Error{Status: http.StatusForbidden, Reason: "Signer " + string(signer) + " is not authorized to allocate on this node"}
	}
	body, err := readBody(r)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(body)
	if !strings.EqualFold(strings.TrimPrefix(p.BodySHA256, "0x"), hex.EncodeToString(sum[:])) {
		return nil, unauthorized("body does not match body_sha256")
	}
	if err := a.remember(r.Context(), payload); err != nil {
		return nil, err
	}
	return body, nil
}

// remember refuses a payload seen before within the time window. Payload
// hashes are kept rather than signatures, which ECDSA makes malleable.
func (a *Allocation) remember(ctx context.Context, payload []byte) error {
	sum := sha256.Sum256(payload)
	now := a.now()
	// A payload is acceptable until its iat is maxAge old; keep it twice
	// that long to cover clock skew in both directions.
	fresh, err := a.replays.remember(context.WithoutCancel(ctx), sum[:], now, now.Add(2*a.maxAge))
	if err != nil {
		return replayCacheError(err)
	}
	if !fresh {
		return unauthorized("this signed payload was already used")
	}
	return nil
}

func parseParams(params string) (sig, payload string, err error) {
	seen := map[string]string{}
	for _, part := range strings.Split(params, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return "", "", fmt.Errorf("malformed parameter %q", part)
		}
		if _, dup := seen[k]; dup {
			return "", "", fmt.Errorf("parameter %q given twice", k)
		}
		seen[k] = v
	}
	if len(seen) != 2 || seen["sig"] == "" || seen["payload"] == "" {
		return "", "", errors.New("parameters must be exactly sig and payload")
	}
	return seen["sig"], seen["payload"], nil
}

func readBody(r *http.Request) ([]byte, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, MaxBodyBytes+1))
	var limited *http.MaxBytesError
	switch {
	case errors.As(err, &limited):
		// The caller bounded the body itself (http.MaxBytesReader).
		return nil, tooLarge()
	case err != nil:
		return nil, &Error{Status: http.StatusBadRequest, Reason: "read body: " + err.Error()}
	}
	if len(body) > MaxBodyBytes {
		return nil, tooLarge()
	}
	return body, nil
}

// tooLarge is a body past MaxBodyBytes: not a bad credential but a
// request too large, as the reference's aiohttp answers it.
func tooLarge() *Error {
	return &Error{Status: http.StatusRequestEntityTooLarge, Reason: fmt.Sprintf("Request body is larger than the %d bytes a scheduler call may have", MaxBodyBytes)}
}
