package aggregate

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const owner = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"

// fakeAPI serves aggregates by owner, counting the calls.
type fakeAPI struct {
	*httptest.Server
	calls  atomic.Int32
	bodies map[string]string // by "<owner>/<key>"
	status int
}

func newFakeAPI(t *testing.T) *fakeAPI {
	f := &fakeAPI{bodies: map[string]string{}}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.calls.Add(1)
		if f.status != 0 {
			w.WriteHeader(f.status)
			return
		}
		addr := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/api/v0/aggregates/"), ".json")
		body, ok := f.bodies[addr+"/"+r.URL.Query().Get("keys")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(body))
	}))
	t.Cleanup(f.Close)
	return f
}

func TestGrants(t *testing.T) {
	api := newFakeAPI(t)
	api.bodies[owner+"/security"] = `{"address":"` + owner + `","data":{"security":{"authorizations":[
		{"address":"0x70997970C51812dc3A010C7d01b50e0d17dc79C8"},
		{"address":"0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC","types":["INSTANCE"]},
		{"address":"0x90F79bf6EB2c4f870365E785982E1f101E93b906","types":["POST"]},
		{"address":"9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM","types":["PROGRAM"]},
		"not an object", {"types":[]}, {"address":42}
	]}}}`
	now := time.Unix(1000, 0)
	c := New(Options{APIServer: api.URL, Now: func() time.Time { return now }})
	ctx := context.Background()
	for _, tc := range []struct {
		addr, typ string
		want      bool
	}{
		{"0x70997970c51812dc3a010c7d01b50e0d17dc79c8", "INSTANCE", true},
		{"0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "PROGRAM", true},
		{"0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "INSTANCE", true},
		{"0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "PROGRAM", false},
		{"0x90F79bf6EB2c4f870365E785982E1f101E93b906", "INSTANCE", false},
		{"9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM", "PROGRAM", true},
		{"9wzdxwbbmkg8ztbnmquxvqrayrzzdsgydlvl9zytawwm", "PROGRAM", false},
		{"0x0000000000000000000000000000000000000000", "INSTANCE", false},
		{"", "INSTANCE", false},
	} {
		got, err := c.Grants(ctx, owner, tc.addr, tc.typ)
		if err != nil || got != tc.want {
			t.Errorf("%s %s: %v %v, want %v", tc.addr, tc.typ, got, err, tc.want)
		}
	}
	if n := api.calls.Load(); n != 1 {
		t.Errorf("%d fetches within the TTL, want 1", n)
	}
	now = now.Add(121 * time.Second)
	c.Grants(ctx, owner, "0x0", "INSTANCE")
	if n := api.calls.Load(); n != 2 {
		t.Errorf("%d fetches after the TTL, want 2", n)
	}
}

func TestGrantsFailures(t *testing.T) {
	api := newFakeAPI(t)
	c := New(Options{APIServer: api.URL})
	ctx := context.Background()
	// No aggregate: nothing granted, no error.
	if ok, err := c.Grants(ctx, "0xabc", "0xdef", "INSTANCE"); ok || err != nil {
		t.Fatalf("no aggregate: %v %v", ok, err)
	}
	// A failing API grants nothing and is asked again next time.
	api.status = 500
	delete(c.security, "0x1")
	for range 2 {
		if ok, err := c.Grants(ctx, "0x1", "0x2", "INSTANCE"); ok || err == nil {
			t.Fatalf("failing API: %v %v", ok, err)
		}
	}
	before := api.calls.Load()
	c.Grants(ctx, "0x1", "0x2", "INSTANCE")
	if api.calls.Load() != before+1 {
		t.Fatal("a failed fetch was cached")
	}
	// Hostile answers.
	api.status = 0
	for name, body := range map[string]string{
		"not JSON":       "<html>",
		"huge":           `{"data":{"security":"` + strings.Repeat("a", maxAnswer) + `"}}`,
		"wrong shape":    `{"data":{"security":{"authorizations":"all"}}}`,
		"data not a map": `{"data":[1,2]}`,
	} {
		api.bodies["0xbad/security"] = body
		c := New(Options{APIServer: api.URL})
		if ok, err := c.Grants(ctx, "0xbad", "0x2", "INSTANCE"); ok || err == nil {
			t.Errorf("%s: %v %v", name, ok, err)
		}
	}
	// No API server: nobody is granted anything.
	if ok, err := New(Options{}).Grants(ctx, owner, owner, "INSTANCE"); ok || err != nil {
		t.Errorf("no API: %v %v", ok, err)
	}
}

func TestGrantsCacheBound(t *testing.T) {
	api := newFakeAPI(t)
	c := New(Options{APIServer: api.URL, MaxOwners: 3})
	for i := range 10 {
		c.Grants(context.Background(), "0x"+strings.Repeat(string(rune('a'+i)), 40), "0x2", "INSTANCE")
	}
	if len(c.security) > 3 {
		t.Fatalf("%d owners cached, bound 3", len(c.security))
	}
}

func TestPortForwarding(t *testing.T) {
	api := newFakeAPI(t)
	ref := strings.Repeat("ab", 32)
	api.bodies[owner+"/port-forwarding"] = `{"data":{"port-forwarding":{
		"` + ref + `":{"ports":{"80":{"tcp":true,"udp":false},"53":{"tcp":true,"udp":true},"5000":{"udp":true},
			"0":{"tcp":true},"70000":{"tcp":true},"http":{"tcp":true},"8080":{"tcp":false,"udp":false},"-1":{"tcp":true}}},
		"other":{"ports":{"22":{"tcp":true}}}}}}`
	c := New(Options{APIServer: api.URL, MaxPorts: 3})
	got, err := c.PortForwarding(context.Background(), owner, ref)
	if err != nil {
		t.Fatal(err)
	}
	want := []Port{{53, true, true}, {80, true, false}, {5000, false, true}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	c.opts.MaxPorts = 2
	if got, _ := c.PortForwarding(context.Background(), owner, ref); len(got) != 2 {
		t.Errorf("bound: %v", got)
	}
	if got, err := c.PortForwarding(context.Background(), "0xnobody", ref); got != nil || err != nil {
		t.Errorf("no aggregate: %v %v", got, err)
	}
	if got, err := c.PortForwarding(context.Background(), owner, strings.Repeat("cd", 32)); got != nil || err != nil {
		t.Errorf("no entry for the VM: %v %v", got, err)
	}
	api.status = 503
	if _, err := c.PortForwarding(context.Background(), owner, ref); err == nil {
		t.Error("failing API: no error")
	}
}
