package hostile

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/guestapi"
	"github.com/alephvm/alephvm/message"
)

// guestAPIRows: calls a program makes to the node's guest API
// (guestapi.Service, with its SQLite cache, signing key and a fake core
// node), as the control channel hands them over.
func guestAPIRows() []row {
	prog := message.ItemHash(strings.Repeat("ab", 32))
	service := func(t *testing.T) *guestapi.Service {
		d, err := db.Open(context.Background(), filepath.Join(t.TempDir(), "node.sqlite"), slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		core := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/huge" {
				w.Write(make([]byte, guest.MaxAPIAnswer+1))
				return
			}
			http.NotFound(w, r)
		}))
		t.Cleanup(core.Close)
		key, err := guestapi.LoadKey(filepath.Join(t.TempDir(), "key"))
		if err != nil {
			t.Fatal(err)
		}
		return guestapi.New(guestapi.Options{DB: d, APIServer: core.URL, Key: key})
	}
	call := func(input, method, path string, body []byte) row {
		return row{category: "Guest API", input: input, target: "guestapi.Service", run: func(t *testing.T) answer {
			a := service(t).Handler(prog)(context.Background(), guest.APICall{ID: 1, Method: method, Path: path, Body: body})
			if a.Status < 400 {
				t.Fatalf("accepted: %d %s", a.Status, a.Body)
			}
			return answer{kind: refused, text: fmt.Sprintf("%d %s", a.Status, strings.TrimSpace(string(a.Body)))}
		}}
	}
	signFor := func(address string) []byte {
		return []byte(fmt.Sprintf(`{"chain":"ETH","sender":"0x0","type":"POST","item_hash":"x","item_content":"{\"address\":\"%s\"}"}`, address))
	}
	return []row{
		call("a cache key with a path: `../../etc/passwd`", "PUT", "/cache/../../etc/passwd", []byte("x")),
		call("a cache key with a NUL byte", "PUT", "/cache/a%00b", []byte("x")),
		call("a cache key of 257 characters", "PUT", "/cache/"+strings.Repeat("k", 257), []byte("x")),
		call("a cache value of 1 MiB + 1", "PUT", "/cache/big", make([]byte, 1<<20+1)),
		call("SQL in a key pattern: `a' OR 1=1`", "GET", "/cache/?pattern=a'%20OR%201=1", nil),
		call("a full URL as the proxy's path: `//evil.example/x`", "GET", "//evil.example/x", nil),
		call("a path out of the core node's API: `/a/../../x`", "GET", "/a/../../x", nil),
		call("a core node answer of 2 MiB + 1", "GET", "/huge", nil),
		call("a write through the read-only proxy", "POST", "/api/v0/messages", []byte("{}")),
		call("a message posted through pubsub", "POST", "/api/v0/ipfs/pubsub/pub", []byte(`{"topic":"ALEPH","data":"{}"}`)),
		call("signing a message as another program", "POST", "/sign", signFor(strings.Repeat("cd", 32))),
		call("signing a message that is not JSON", "POST", "/sign", []byte("{")),
	}
}
