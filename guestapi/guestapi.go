// Package guestapi serves the guest API on the node: what programs built
// with the Aleph SDK call from inside their VM (the reference's
// guest_api): the signing key's properties and signatures, a cache kept
// per program, and read-only access to the core node's API. The calls
// reach it over the VM's control channel (guest.Client.ServeAPI); every
// one of them is hostile input from a tenant.
package guestapi

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/decred/dcrd/dcrec/secp256k1/v4"

	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

// Defaults of the bounds.
const (
	DefaultCacheTTL          = 7 * 24 * time.Hour // the reference's CACHE_EXPIRES_AFTER
	DefaultMaxValueSize      = 1 << 20
	DefaultMaxKeysPerProgram = 10_000
	DefaultMaxCacheSize      = 1 << 30
	maxKeyLength             = 256
	// proxyTimeout bounds a call to the core node.
	proxyTimeout = 30 * time.Second
)

// Options configure the service.
type Options struct {
	// DB keeps the cache (table guest_cache).
	DB *sql.DB
	// APIServer is the core node the read-only proxy reaches; empty
	// answers 503.
	APIServer string
	// Key signs for programs; see LoadKey.
	Key *secp256k1.PrivateKey
	// Client makes the proxy's calls; nil means a default one.
	Client *http.Client
	// Bounds of the cache; 0 means the defaults.
	CacheTTL          time.Duration
	MaxValueSize      int
	MaxKeysPerProgram int
	MaxCacheSize      int64
	Log               *slog.Logger
	now               func() time.Time
}

// Service answers the guest API of every program VM.
type Service struct {
	opts Options
}

// New returns the service.
func New(opts Options) *Service {
	if opts.Client == nil {
		opts.Client = &http.Client{Timeout: proxyTimeout}
	}
	if opts.CacheTTL <= 0 {
		opts.CacheTTL = DefaultCacheTTL
	}
	if opts.MaxValueSize <= 0 {
		opts.MaxValueSize = DefaultMaxValueSize
	}
	if opts.MaxKeysPerProgram <= 0 {
		opts.MaxKeysPerProgram = DefaultMaxKeysPerProgram
	}
	if opts.MaxCacheSize <= 0 {
		opts.MaxCacheSize = DefaultMaxCacheSize
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.now == nil {
		opts.now = time.Now
	}
	return &Service{opts: opts}
}

// LoadKey reads the node's signing key for programs from path (hex), or
// makes and saves one (0600) when there is none.
func LoadKey(path string) (*secp256k1.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		b, err := hex.DecodeString(strings.TrimSpace(string(data)))
		if err != nil || len(b) != 32 {
			return nil, fmt.Errorf("guest API key %s: not 32 bytes of hex", path)
		}
		return secp256k1.PrivKeyFromBytes(b), nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("guest API key: %w", err)
	}
	key, err := secp256k1.GeneratePrivateKey()
	if err != nil {
		return nil, fmt.Errorf("guest API key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("guest API key: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(hex.EncodeToString(key.Serialize())+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("guest API key: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, fmt.Errorf("guest API key: %w", err)
	}
	return key, nil
}

// Handler returns the guest API of program ref's VM.
func (s *Service) Handler(ref message.ItemHash) guest.APIHandler {
	return func(ctx context.Context, c guest.APICall) guest.APIAnswer {
		a := s.serve(ctx, ref, c)
		if a.Status >= 400 {
			s.opts.Log.Debug("guest API call refused", "ref", ref, "method", c.Method, "path", cutText(c.Path, 200), "status", a.Status)
		}
		return a
	}
}

func (s *Service) serve(ctx context.Context, ref message.ItemHash, c guest.APICall) guest.APIAnswer {
	u, err := url.ParseRequestURI(c.Path)
	if err != nil {
		return text(http.StatusBadRequest, "Invalid path")
	}
	path := u.Path
	switch {
	case path == "/properties" && c.Method == http.MethodGet:
		return s.properties()
	case path == "/sign" && c.Method == http.MethodPost:
		return s.sign(ref, c.Body)
	case path == "/cache/" && c.Method == http.MethodGet:
		return s.keys(ctx, ref, u.Query().Get("pattern"), u.Query().Has("pattern"))
	case strings.HasPrefix(path, "/cache/"):
		key := strings.TrimPrefix(path, "/cache/")
		switch c.Method {
		case http.MethodGet:
			return s.get(ctx, ref, key)
		case http.MethodPut:
			return s.put(ctx, ref, key, c.Body)
		case http.MethodDelete:
			return s.delete(ctx, ref, key)
		}
	case c.Method == http.MethodGet || c.Method == http.MethodHead || c.Method == http.MethodOptions:
		return s.proxy(ctx, c.Method, u)
	case c.Method == http.MethodPost && (path == "/api/v0/ipfs/pubsub/pub" || path == "/api/v0/p2p/pubsub/pub"):
		return text(http.StatusForbidden, "Posting messages from a VM is not supported by this node")
	}
	return text(http.StatusMethodNotAllowed, "Method Not Allowed")
}

func text(status int, msg string) guest.APIAnswer {
	return guest.APIAnswer{Status: status, ContentType: "text/plain; charset=utf-8", Body: []byte(msg)}
}

func jsonAnswer(v any) guest.APIAnswer {
	b, err := json.Marshal(v)
	if err != nil {
		return text(http.StatusInternalServerError, err.Error())
	}
	return guest.APIAnswer{Status: http.StatusOK, ContentType: "application/json; charset=utf-8", Body: b}
}

// properties answers as the reference's VM connector: the signing key's.
func (s *Service) properties() guest.APIAnswer {
	if s.opts.Key == nil {
		return text(http.StatusServiceUnavailable, "This node has no signing key for programs")
	}
	pub := s.opts.Key.PubKey()
	return jsonAnswer(map[string]string{
		"chain": "ETH", "curve": "secp256k1", "address": string(auth.AddressOf(pub)),
		"public_key": "0x" + hex.EncodeToString(pub.SerializeCompressed()),
	})
}

// sign signs a message of the program, as the reference: its content's
// address must be the program's item hash, so that a program signs only
// as itself.
func (s *Service) sign(ref message.ItemHash, body []byte) guest.APIAnswer {
	if s.opts.Key == nil {
		return text(http.StatusServiceUnavailable, "This node has no signing key for programs")
	}
	var msg map[string]any
	if err := json.Unmarshal(body, &msg); err != nil {
		return text(http.StatusBadRequest, "The message is not a JSON object")
	}
	contentText, _ := msg["item_content"].(string)
	var content struct {
		Address string `json:"address"`
	}
	if err := json.Unmarshal([]byte(contentText), &content); err != nil || content.Address != string(ref) {
		return text(http.StatusBadRequest, "Message address does not match VM item_hash")
	}
	var parts [4]string
	for i, k := range []string{"chain", "sender", "type", "item_hash"} {
		v, ok := msg[k].(string)
		if !ok || v == "" {
			return text(http.StatusBadRequest, "The message has no "+k)
		}
		parts[i] = v
	}
	if parts[0] != "ETH" || !strings.EqualFold(parts[1], string(auth.AddressOf(s.opts.Key.PubKey()))) {
		return text(http.StatusBadRequest, "This node signs ETH messages sent by its own address (see /properties) only")
	}
	sig := auth.SignPersonal(s.opts.Key, []byte(strings.Join(parts[:], "\n")))
	msg["signature"] = "0x" + hex.EncodeToString(sig)
	return jsonAnswer(msg)
}

// proxy forwards a read to the core node.
func (s *Service) proxy(ctx context.Context, method string, u *url.URL) guest.APIAnswer {
	if s.opts.APIServer == "" {
		return text(http.StatusServiceUnavailable, "This node has no core node API (API_SERVER)")
	}
	if strings.Contains(u.Path, "..") || strings.HasPrefix(u.Path, "//") {
		return text(http.StatusBadRequest, "Invalid path")
	}
	target := strings.TrimSuffix(s.opts.APIServer, "/") + u.EscapedPath()
	if u.RawQuery != "" {
		target += "?" + u.RawQuery
	}
	ctx, cancel := context.WithTimeout(ctx, proxyTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, target, nil)
	if err != nil {
		return text(http.StatusBadRequest, "Invalid path")
	}
	resp, err := s.opts.Client.Do(req)
	if err != nil {
		return text(http.StatusBadGateway, "The core node API did not answer")
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, guest.MaxAPIAnswer+1))
	if err != nil {
		return text(http.StatusBadGateway, "The core node API's answer was cut")
	}
	if len(body) > guest.MaxAPIAnswer {
		return text(http.StatusBadGateway, fmt.Sprintf("The core node API's answer is larger than %d bytes", guest.MaxAPIAnswer))
	}
	return guest.APIAnswer{Status: resp.StatusCode, ContentType: resp.Header.Get("Content-Type"), Body: body}
}

// The reference's key and pattern rules.
var (
	validKey     = regexp.MustCompile(`^\w+$`)
	validPattern = regexp.MustCompile(`^[\w?*^\-]+$`)
)

func checkKey(key string) *guest.APIAnswer {
	if len(key) > maxKeyLength || !validKey.MatchString(key) {
		a := text(http.StatusBadRequest, "Invalid key")
		return &a
	}
	return nil
}

func (s *Service) get(ctx context.Context, ref message.ItemHash, key string) guest.APIAnswer {
	if a := checkKey(key); a != nil {
		return *a
	}
	var value []byte
	err := s.opts.DB.QueryRowContext(ctx, `SELECT value FROM guest_cache WHERE namespace = ? AND key = ? AND expires_at > ?`,
		string(ref), key, s.opts.now().UnixNano()).Scan(&value)
	if errors.Is(err, sql.ErrNoRows) {
		return text(http.StatusNotFound, "No such key in cache")
	}
	if err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	return guest.APIAnswer{Status: http.StatusOK, ContentType: "application/octet-stream", Body: value}
}

func (s *Service) put(ctx context.Context, ref message.ItemHash, key string, value []byte) guest.APIAnswer {
	if a := checkKey(key); a != nil {
		return *a
	}
	if len(value) > s.opts.MaxValueSize {
		return text(http.StatusRequestEntityTooLarge, fmt.Sprintf("Values are at most %d bytes", s.opts.MaxValueSize))
	}
	now := s.opts.now().UnixNano()
	tx, err := s.opts.DB.BeginTx(ctx, nil)
	if err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	defer tx.Rollback()
	var keys int
	var exists bool
	var total int64
	if err := tx.QueryRowContext(ctx, `SELECT count(*), coalesce(sum(key = ?), 0) FROM guest_cache WHERE namespace = ? AND expires_at > ?`,
		key, string(ref), now).Scan(&keys, &exists); err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	if !exists && keys >= s.opts.MaxKeysPerProgram {
		return text(http.StatusInsufficientStorage, fmt.Sprintf("A program keeps at most %d keys in the cache", s.opts.MaxKeysPerProgram))
	}
	if err := tx.QueryRowContext(ctx, `SELECT coalesce(sum(length(value) + length(key)), 0) FROM guest_cache WHERE expires_at > ?`, now).Scan(&total); err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	if total+int64(len(value)+len(key)) > s.opts.MaxCacheSize {
		return text(http.StatusInsufficientStorage, "The node's cache is full")
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO guest_cache (namespace, key, value, expires_at) VALUES (?, ?, ?, ?)
		ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at`,
		string(ref), key, value, s.opts.now().Add(s.opts.CacheTTL).UnixNano()); err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	if err := tx.Commit(); err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	return jsonAnswer(true)
}

func (s *Service) delete(ctx context.Context, ref message.ItemHash, key string) guest.APIAnswer {
	if a := checkKey(key); a != nil {
		return *a
	}
	res, err := s.opts.DB.ExecContext(ctx, `DELETE FROM guest_cache WHERE namespace = ? AND key = ? AND expires_at > ?`,
		string(ref), key, s.opts.now().UnixNano())
	if err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	n, _ := res.RowsAffected()
	return jsonAnswer(n) // redis DEL's count, as the reference
}

// keys lists the program's keys that match a Redis glob pattern (the
// reference's KEYS), without ever handing the pattern to SQL as one.
func (s *Service) keys(ctx context.Context, ref message.ItemHash, pattern string, given bool) guest.APIAnswer {
	if !given {
		pattern = "*"
	}
	if len(pattern) > maxKeyLength || !validPattern.MatchString(pattern) {
		return text(http.StatusBadRequest, "Invalid key")
	}
	match := globMatcher(pattern)
	rows, err := s.opts.DB.QueryContext(ctx, `SELECT key FROM guest_cache WHERE namespace = ? AND expires_at > ? ORDER BY key`,
		string(ref), s.opts.now().UnixNano())
	if err != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	defer rows.Close()
	keys := []string{}
	for rows.Next() {
		var k string
		if rows.Scan(&k) == nil && match(k) {
			keys = append(keys, k)
		}
	}
	if rows.Err() != nil {
		return text(http.StatusInternalServerError, "The cache failed")
	}
	return jsonAnswer(keys)
}

// globMatcher matches Redis glob patterns of the characters the reference
// allows: * any run, ? one character, ^ and - themselves (outside of a
// bracket Redis takes them literally).
func globMatcher(pattern string) func(string) bool {
	var re bytes.Buffer
	re.WriteByte('^')
	for _, r := range pattern {
		switch r {
		case '*':
			re.WriteString(".*")
		case '?':
			re.WriteByte('.')
		default:
			re.WriteString(regexp.QuoteMeta(string(r)))
		}
	}
	re.WriteByte('$')
	compiled := regexp.MustCompile(re.String())
	return compiled.MatchString
}

// Sweep removes expired entries every interval until ctx ends.
func (s *Service) Sweep(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if err := s.sweep(ctx); err != nil && ctx.Err() == nil {
			s.opts.Log.Warn("sweep the guest cache", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sweep removes the expired entries.
func (s *Service) sweep(ctx context.Context) error {
	_, err := s.opts.DB.ExecContext(ctx, `DELETE FROM guest_cache WHERE expires_at <= ?`, s.opts.now().UnixNano())
	return err
}

func cutText(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
