// Package aggregate reads VM owners' aggregates from the Aleph API
// (API_SERVER): the security aggregate, whose authorizations let other
// wallets act on an owner's VMs, and the port-forwarding aggregate, which
// says which ports of each VM the node forwards.
package aggregate

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Options configure a Client.
type Options struct {
	// APIServer is the Aleph API's base URL; empty means no aggregates:
	// nobody is granted anything and no port is asked for.
	APIServer string
	Client    *http.Client
	// SecurityTTL is how long a security aggregate is trusted (the
	// reference's CACHE_TTL_SECURITY_AGGREGATE, 120 s, when zero).
	SecurityTTL time.Duration
	// MaxOwners bounds the security aggregates kept (4096 when zero).
	MaxOwners int
	// MaxPorts bounds the ports one VM's port-forwarding entry may ask for
	// (64 when zero); the lowest ports are kept.
	MaxPorts int
	Now      func() time.Time
}

// Client reads aggregates, caching security aggregates.
type Client struct {
	opts Options

	mu       sync.Mutex
	security map[string]cached // by owner address in lower case
}

type cached struct {
	auths   []Authorization
	fetched time.Time
}

// New returns a client.
func New(o Options) *Client {
	if o.Client == nil {
		o.Client = &http.Client{Timeout: 10 * time.Second}
	}
	if o.SecurityTTL == 0 {
		o.SecurityTTL = 120 * time.Second
	}
	if o.MaxOwners == 0 {
		o.MaxOwners = 4096
	}
	if o.MaxPorts == 0 {
		o.MaxPorts = 64
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	o.APIServer = strings.TrimRight(o.APIServer, "/")
	return &Client{opts: o, security: map[string]cached{}}
}

// maxAnswer bounds an aggregate answer read from the API.
const maxAnswer = 1 << 20

// Fetch returns the value of key in owner's aggregate, or nil when the
// owner has none (the API answers 404, or the key is absent).
func (c *Client) Fetch(ctx context.Context, owner, key string) (json.RawMessage, error) {
	if c.opts.APIServer == "" {
		return nil, nil
	}
	u := c.opts.APIServer + "/api/v0/aggregates/" + url.PathEscape(owner) + ".json?keys=" + url.QueryEscape(key)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.opts.Client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch %s aggregate of %s: %w", key, owner, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, nil
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch %s aggregate of %s: API answered %s", key, owner, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	if err != nil {
		return nil, fmt.Errorf("fetch %s aggregate of %s: %w", key, owner, err)
	}
	if len(body) > maxAnswer {
		return nil, fmt.Errorf("fetch %s aggregate of %s: answer larger than %d bytes", key, owner, maxAnswer)
	}
	var answer struct {
		Data map[string]json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &answer); err != nil {
		return nil, fmt.Errorf("read %s aggregate of %s: %w", key, owner, err)
	}
	v := answer.Data[key]
	if string(v) == "null" {
		return nil, nil
	}
	return v, nil
}

// Authorization is one entry of a security aggregate's authorizations.
type Authorization struct {
	Address string `json:"address"`
	// Types are the message types the grant covers; none means all.
	Types []string `json:"types"`
}

// authorizations reads owner's grants, from the cache while fresh. A
// failed fetch is not cached: the next call asks again.
func (c *Client) authorizations(ctx context.Context, owner string) ([]Authorization, error) {
	key := strings.ToLower(owner)
	now := c.opts.Now()
	c.mu.Lock()
	e, ok := c.security[key]
	c.mu.Unlock()
	if ok && now.Sub(e.fetched) < c.opts.SecurityTTL {
		return e.auths, nil
	}
	raw, err := c.Fetch(ctx, owner, "security")
	if err != nil {
		return nil, err
	}
	var sec struct {
		Authorizations []json.RawMessage `json:"authorizations"`
	}
	if raw != nil {
		if err := json.Unmarshal(raw, &sec); err != nil {
			return nil, fmt.Errorf("read security aggregate of %s: %w", owner, err)
		}
	}
	var auths []Authorization
	for _, a := range sec.Authorizations {
		var auth Authorization
		// An entry of another shape grants nothing, as in the reference.
		if json.Unmarshal(a, &auth) == nil && auth.Address != "" {
			auths = append(auths, auth)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.security) >= c.opts.MaxOwners {
		for k, v := range c.security {
			if now.Sub(v.fetched) >= c.opts.SecurityTTL || len(c.security) >= c.opts.MaxOwners {
				delete(c.security, k)
			}
		}
	}
	c.security[key] = cached{auths: auths, fetched: now}
	return auths, nil
}

// sameAddress compares Ethereum addresses in any case and others exactly.
func sameAddress(a, b string) bool {
	if strings.HasPrefix(a, "0x") && strings.HasPrefix(b, "0x") {
		return strings.EqualFold(a, b)
	}
	return a == b
}

// Grants reports whether owner's security aggregate lets address act on
// owner's VMs of messageType ("INSTANCE" or "PROGRAM"): an authorization
// for address whose types are empty or name messageType. The reference
// checks INSTANCE whatever the VM; a program's delegate needs PROGRAM (or
// no types) here.
func (c *Client) Grants(ctx context.Context, owner, address, messageType string) (bool, error) {
	auths, err := c.authorizations(ctx, owner)
	if err != nil {
		return false, err
	}
	for _, a := range auths {
		if sameAddress(a.Address, address) && (len(a.Types) == 0 || slices.Contains(a.Types, messageType)) {
			return true, nil
		}
	}
	return false, nil
}

// Port is a VM port an owner asks to be forwarded.
type Port struct {
	Port uint16
	TCP  bool
	UDP  bool
}

// PortForwarding returns the ports owner's port-forwarding aggregate
// asks for VM ref, by port: {"<ref>": {"ports": {"<port>": {"tcp": true,
// "udp": false}}}}. Entries that are not ports or ask for no protocol are
// left out.
func (c *Client) PortForwarding(ctx context.Context, owner, ref string) ([]Port, error) {
	raw, err := c.Fetch(ctx, owner, "port-forwarding")
	if err != nil || raw == nil {
		return nil, err
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(raw, &all); err != nil {
		return nil, fmt.Errorf("read port-forwarding aggregate of %s: %w", owner, err)
	}
	var vm struct {
		Ports map[string]struct {
			TCP bool `json:"tcp"`
			UDP bool `json:"udp"`
		} `json:"ports"`
	}
	if entry, ok := all[ref]; !ok || json.Unmarshal(entry, &vm) != nil {
		return nil, nil
	}
	var out []Port
	for k, v := range vm.Ports {
		p, err := strconv.ParseUint(k, 10, 16)
		if err != nil || p == 0 || (!v.TCP && !v.UDP) {
			continue
		}
		out = append(out, Port{Port: uint16(p), TCP: v.TCP, UDP: v.UDP})
	}
	slices.SortFunc(out, func(a, b Port) int { return int(a.Port) - int(b.Port) })
	if len(out) > c.opts.MaxPorts {
		out = out[:c.opts.MaxPorts]
	}
	return out, nil
}
