package selfcheck

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// loopbackResolver answers every name from a map, over no network.
func hosts(t *testing.T) (v4, v6 string) {
	srv4 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) }))
	t.Cleanup(srv4.Close)
	ln6, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skip("no IPv6 loopback")
	}
	srv6 := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(404) }))
	srv6.Listener = ln6
	srv6.Start()
	t.Cleanup(srv6.Close)
	return srv4.URL + "/", srv6.URL + "/"
}

func TestCheckHost(t *testing.T) {
	v4, v6 := hosts(t)
	// "localhost" resolves to 127.0.0.1 and ::1 from /etc/hosts, without
	// a DNS server.
	port4 := v4[strings.LastIndex(v4, ":"):]
	c := &Checker{Targets: Targets{IPv4URL: v4, IPv6URL: v6, DNSHostname: "localhost", Domain: "localhost",
		HTTPURLs: []string{"http://127.0.0.1:1/", "http://localhost" + port4}}}
	body, ok := c.CheckHost(context.Background())
	t.Logf("%s", body)
	if !strings.HasPrefix(string(body), `{"ipv4": {"egress": true, "dns": true, "domain": true, "http": true}, "ipv6": {"egress": true, `) {
		t.Errorf("healthy: %s", body)
	}
	if strings.Contains(string(body), `"ipv6": {"egress": true, "dns": true, "domain": true`) != ok {
		t.Errorf("ok %v for %s", ok, body)
	}

	bad := &Checker{Targets: Targets{IPv4URL: "http://127.0.0.1:1/", IPv6URL: "http://[::1]:1/", DNSHostname: "no-such-name.invalid", Domain: ""}}
	body, ok = bad.CheckHost(context.Background())
	if ok || string(body) != `{"ipv4": {"egress": false, "dns": false, "domain": false, "http": false}, "ipv6": {"egress": false, "dns": false, "domain": false, "http": false}}` {
		t.Errorf("unreachable: %v %s", ok, body)
	}
}

func TestCheckIPv6(t *testing.T) {
	_, v6 := hosts(t)
	c := &Checker{Targets: Targets{IPv6URL: v6}, VMIPv6: func(context.Context) bool { return true }}
	if got := string(c.CheckIPv6(context.Background())); got != `{"host": true, "vm": true}` {
		t.Errorf("got %s", got)
	}
	if got := string((&Checker{}).CheckIPv6(context.Background())); got != `{"host": false, "vm": false}` {
		t.Errorf("nothing set: %s", got)
	}
}

func TestConcurrentCallersShareARun(t *testing.T) {
	var hits atomic.Int32
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		<-release
	}))
	defer srv.Close()
	c := &Checker{Targets: Targets{IPv4URL: srv.URL}}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() { defer wg.Done(); c.CheckHost(context.Background()) }()
	}
	for hits.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()
	if n := hits.Load(); n != 1 {
		t.Errorf("%d probes for 4 concurrent callers", n)
	}
}
