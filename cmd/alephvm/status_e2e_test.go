package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
)

// feedMessage is a valid inline POST message on channel.
func feedMessage(t *testing.T, channel, body string) []byte {
	t.Helper()
	sender := "0x0000000000000000000000000000000000000002"
	env := map[string]any{"chain": "ETH", "sender": sender, "type": "POST", "time": 1800000000.5, "item_type": "inline", "signature": nil,
		"channel": channel, "content": map[string]any{"address": sender, "time": 1800000000.5, "type": "note", "content": map[string]any{"body": body}}}
	raw, _ := json.Marshal(env)
	raw, err := message.Regenerate(raw)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// fakeCoreNode answers the core node API routes the diagnostic program
// reads through the guest API (one message, by hash), and its message
// feed, which sends frames to every connection.
func fakeCoreNode(t *testing.T, hash string, frames ...[]byte) *httptest.Server {
	msg := map[string]any{"item_hash": hash, "type": "POST", "chain": "ETH", "sender": "0x0", "channel": "TEST"}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/api/ws0/messages" {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			for _, f := range frames {
				c.Write(r.Context(), websocket.MessageText, f)
			}
			<-r.Context().Done()
			return
		}
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/api/v0/messages.json" && r.URL.Query().Get("hashes") == hash:
			json.NewEncoder(w).Encode(map[string]any{"messages": []any{msg}, "pagination_page": 1, "pagination_total": 1, "pagination_per_page": 20, "pagination_item": "messages"})
		case r.URL.Path == "/api/v0/messages/"+hash:
			json.NewEncoder(w).Encode(map[string]any{"status": "processed", "item_hash": hash, "message": msg})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestStatusChecksEndToEnd checks /status/check/fastapi on a fresh node:
// the node stores and boots its own diagnostic program, which reaches a
// fake internet (a namespace with DNS and a web server beyond the node's
// uplink) and the fake core node through the guest API. With the uplink
// down, the check fails, naming what failed. One VM boot.
func TestStatusChecksEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a program VM under emulation")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "nft", "mkfs.ext4", "ip")
	assetsDir := testassets.ProgramAssets(t)
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	internet := testenv.NetNS(t, "inet")
	testenv.Veth(t, "up0", "10.99.0.1/24", internet, "eth0", "10.99.0.2/24", "")
	testenv.Cmd(t, "ip", "-n", internet, "addr", "add", "203.0.113.10/32", "dev", "lo")
	testenv.Cmd(t, "ip", "-n", internet, "addr", "add", "203.0.113.53/32", "dev", "lo")
	testenv.Cmd(t, "ip", "route", "add", "default", "via", "10.99.0.2")
	// IPv6 on the uplink too, for the host's checks.
	testenv.Cmd(t, "ip", "addr", "add", "2001:db8:99::1/64", "dev", "up0", "nodad")
	testenv.Cmd(t, "ip", "-n", internet, "addr", "add", "2001:db8:99::2/64", "dev", "eth0", "nodad")
	testenv.Cmd(t, "ip", "-n", internet, "addr", "add", "2001:db8::10/128", "dev", "lo")
	testenv.Cmd(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:99::2")
	testenv.ServeDNS(t, internet, "203.0.113.53:53", map[string][]netip.Addr{
		"web.test":  {netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8::10")},
		"node.test": {netip.MustParseAddr("10.99.0.1"), netip.MustParseAddr("2001:db8:99::1")},
	})
	testenv.ServeWeb(t, internet, "203.0.113.10:80")
	testenv.ServeWeb(t, internet, "[2001:db8::10]:80")
	hash := strings.Repeat("5e", 32)
	match := feedMessage(t, "ALEPHVM-TEST", "for the subscriber")
	core := fakeCoreNode(t, hash, []byte("garbage"), []byte(`{"confirmation": true}`),
		feedMessage(t, "OTHER", "not for it"), match)

	_, port, env := nodeEnv(t, "up0", "203.0.113.53")
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_INIT_TIMEOUT=180", "ALEPH_VM_API_SERVER="+core.URL,
		"ALEPH_VM_DIAGNOSTIC_DNS_NAME=web.test", "ALEPH_VM_DIAGNOSTIC_IPV4_URLS=http://203.0.113.10/",
		"ALEPH_VM_DIAGNOSTIC_INTERNET_URLS=http://web.test/", "ALEPH_VM_DIAGNOSTIC_MESSAGE="+hash,
		"ALEPH_VM_DOMAIN_NAME=node.test", "ALEPH_VM_CONNECTIVITY_IPV4_URL=http://203.0.113.10/",
		"ALEPH_VM_CONNECTIVITY_IPV6_URL=http://[2001:db8::10]/", "ALEPH_VM_CONNECTIVITY_DNS_HOSTNAME=web.test",
		"ALEPH_VM_CONNECTIVITY_HTTP_URLS=http://web.test/")
	// A program that subscribes to the test's channel, made before the node
	// starts: the node knows its subscription from its store.
	code, out, errOut := runCLI(t, env, "program", "create", "../../examples/diagnostic", "--entrypoint", "main:app",
		"--subscribe", `{"channel":"ALEPHVM-TEST"}`)
	if code != 0 {
		t.Fatalf("program create: %s %s", out, errOut)
	}
	subscriber := strings.Fields(out)[0]
	node := startNode(t, env, port)

	check := func() (int, map[string]any, string) {
		t.Helper()
		status, body := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/status/check/fastapi", port))
		var result map[string]any
		if err := json.Unmarshal([]byte(body), &result); err != nil {
			t.Fatalf("check: %d %s: %v\n%s", status, body, err, node.logs.String())
		}
		return status, result, body
	}
	start := time.Now()
	status, result, body := check()
	t.Logf("first check (a cold start of the diagnostic program included): %s: %s", time.Since(start).Round(time.Millisecond), body)
	keys := []string{"index", "environ", "messages", "dns", "ipv4", "internet", "cache", "persistent_storage", "error_handling", "get_a_message", "lifespan"}
	for _, k := range keys {
		if result[k] != true {
			t.Errorf("%s: %v", k, result[k])
		}
	}
	if status != 200 || len(result) != len(keys) || t.Failed() {
		t.Fatalf("fresh node: %d %s\n%s", status, body, node.logs.String())
	}

	// The subscriber was booted for the feed's matching message, and got it
	// once, as an event, intact; what reaches it over HTTP is not an event.
	var matchDoc struct {
		ItemHash string `json:"item_hash"`
	}
	json.Unmarshal(match, &matchDoc)
	var events []map[string]any
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		if status, body := httpGet(t, programURL(port, subscriber, "/events")); status == 200 && json.Unmarshal([]byte(body), &events) == nil && len(events) > 0 {
			break
		}
	}
	if len(events) != 1 || events[0]["item_hash"] != matchDoc.ItemHash {
		t.Errorf("events delivered: %v\n%s", events, node.logs.String())
	}
	resp, err := http.Post(programURL(port, subscriber, "/"), "application/json", strings.NewReader(string(match)))
	if err == nil {
		resp.Body.Close()
	}
	if _, body := httpGet(t, programURL(port, subscriber, "/events")); json.Unmarshal([]byte(body), &events) != nil || len(events) != 1 {
		t.Errorf("events after the same JSON posted through the proxy: %s", body)
	}

	host := func() (int, string) {
		t.Helper()
		return httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/status/check/host", port))
	}
	wantHost := `{"ipv4": {"egress": true, "dns": true, "domain": true, "http": true}, "ipv6": {"egress": true, "dns": true, "domain": true, "http": true}}`
	if status, body := host(); status != 200 || body != wantHost {
		t.Errorf("host check: %d %s, want 200 %s", status, body, wantHost)
	}
	checkStatusPage(t, port, []string{"fastapi (the diagnostic program)", "every check passed", "host (connectivity)"}, "status-page-checks.png")

	// The core node stops: the warm diagnostic program keeps answering,
	// for several seconds, past the plan cache's few seconds.
	diagRef := ""
	for ref, vm := range listVMs(t, port) {
		if vm.Running {
			diagRef = ref
		}
	}
	core.Close()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		if status, body := httpGet(t, programURL(port, diagRef, "/lifespan")); status != 200 {
			t.Fatalf("a warm request with the core node stopped: %d %s", status, body)
		}
	}

	// The uplink goes down: the internet checks fail, and say so.
	testenv.Cmd(t, "ip", "link", "set", "up0", "down")
	status, result, body = check()
	if status != 503 || result["dns"] != false || result["ipv4"] != false || result["internet"] != false || result["index"] != true || result["cache"] != true {
		t.Errorf("without internet: %d %s", status, body)
	}
	if status, body := host(); status != 503 || !strings.Contains(body, `"ipv4": {"egress": false, "dns": false`) {
		t.Errorf("host check without internet: %d %s", status, body)
	}
	testenv.Cmd(t, "ip", "link", "set", "up0", "up")
}
