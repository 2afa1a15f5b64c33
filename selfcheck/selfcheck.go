// Package selfcheck checks the host's connectivity as the reference's
// /status/check/host and /status/check/ipv6 do: egress by address, DNS,
// the node's own domain and HTTP by name, over IPv4 and IPv6, against
// targets from settings (so that tests point them at their own
// namespaces).
package selfcheck

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// Targets are what the checks reach.
type Targets struct {
	IPv4URL, IPv6URL string   // egress by address (CONNECTIVITY_IPV4_URL, _IPV6_URL)
	DNSHostname      string   // resolved for an A and an AAAA record
	Domain           string   // the node's DOMAIN_NAME, resolved likewise
	HTTPURLs         []string // tried in order, by name, for each family
}

// Checker runs the checks; concurrent callers share a run.
type Checker struct {
	Targets Targets
	// Resolver resolves names; nil means the host's.
	Resolver *net.Resolver
	// VMIPv6 says whether a VM reaches the outside over IPv6 (the
	// diagnostic program's /ip/6); nil means false.
	VMIPv6 func(ctx context.Context) bool

	runs singleflight.Group

	mu     sync.Mutex
	last   result
	lastAt time.Time
}

// Last returns the last /status/check/host answer and when it was made;
// ok is false before the first.
func (c *Checker) Last() (body []byte, passed bool, at time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last.body, c.last.ok, c.lastAt, !c.lastAt.IsZero()
}

// timeout bounds each probe, as the reference's.
const timeout = 5 * time.Second

// family is one address family's results.
type family struct {
	Egress, DNS, Domain, HTTP bool
}

// CheckHost implements the api's HostChecker: 200 needs egress, DNS and
// the domain in both families; HTTP is advisory, as the reference's.
func (c *Checker) CheckHost(ctx context.Context) ([]byte, bool) {
	v, _, _ := c.runs.Do("host", func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		v4, v6 := c.family(ctx, "tcp4", c.Targets.IPv4URL), c.family(ctx, "tcp6", c.Targets.IPv6URL)
		body := fmt.Sprintf(`{"ipv4": %s, "ipv6": %s}`, v4, v6)
		ok := v4.Egress && v4.DNS && v4.Domain && v6.Egress && v6.DNS && v6.Domain
		c.mu.Lock()
		c.last, c.lastAt = result{[]byte(body), ok}, time.Now()
		c.mu.Unlock()
		return result{[]byte(body), ok}, nil
	})
	r := v.(result)
	return r.body, r.ok
}

type result struct {
	body []byte
	ok   bool
}

func (f family) String() string {
	return fmt.Sprintf(`{"egress": %t, "dns": %t, "domain": %t, "http": %t}`, f.Egress, f.DNS, f.Domain, f.HTTP)
}

func (c *Checker) family(ctx context.Context, network, egressURL string) family {
	ip := "ip4"
	if network == "tcp6" {
		ip = "ip6"
	}
	f := family{Egress: c.reach(ctx, network, egressURL)}
	f.DNS = c.resolves(ctx, ip, c.Targets.DNSHostname)
	f.Domain = c.resolves(ctx, ip, c.Targets.Domain)
	for _, u := range c.Targets.HTTPURLs {
		if f.HTTP = c.reach(ctx, network, u); f.HTTP {
			break
		}
	}
	return f
}

// CheckIPv6 implements the api's HostChecker.
func (c *Checker) CheckIPv6(ctx context.Context) []byte {
	host := c.reach(ctx, "tcp6", c.Targets.IPv6URL)
	vm := false
	if c.VMIPv6 != nil {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		vm = c.VMIPv6(ctx)
		cancel()
	}
	return fmt.Appendf(nil, `{"host": %t, "vm": %t}`, host, vm)
}

// resolves reports whether name has an address of that family.
func (c *Checker) resolves(ctx context.Context, network, name string) bool {
	if name == "" {
		return false
	}
	r := c.Resolver
	if r == nil {
		r = net.DefaultResolver
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	addrs, err := r.LookupIP(ctx, network, name)
	return err == nil && len(addrs) > 0
}

// reach reports whether url answers HTTP at all over that family: any
// status is connectivity, as the reference says.
func (c *Checker) reach(ctx context.Context, network, url string) bool {
	if url == "" {
		return false
	}
	dialer := &net.Dialer{Timeout: timeout, Resolver: c.Resolver}
	client := &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return dialer.DialContext(ctx, network, addr)
			},
			Proxy: nil,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil || !strings.HasPrefix(url, "http") {
		return false
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return true
}
