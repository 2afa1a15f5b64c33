package reactor

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/message"
)

// build makes a valid inline message of type typ with content.
func build(t *testing.T, typ, sender string, content map[string]any, extra map[string]any) []byte {
	t.Helper()
	content["address"], content["time"] = sender, 1700000000.5
	env := map[string]any{"chain": "ETH", "sender": sender, "type": typ, "time": 1700000000.5, "item_type": "inline", "signature": nil, "content": content}
	for k, v := range extra {
		env[k] = v
	}
	raw, _ := json.Marshal(env)
	raw, err := message.Regenerate(raw)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func programWith(t *testing.T, sender string, subs []any) []byte {
	return build(t, "PROGRAM", sender, map[string]any{
		"type": "vm-function", "allow_amend": false,
		"code":        map[string]any{"encoding": "zip", "entrypoint": "main:app", "ref": strings.Repeat("ab", 32), "use_latest": false},
		"runtime":     map[string]any{"ref": strings.Repeat("cd", 32), "use_latest": false, "comment": ""},
		"on":          map[string]any{"http": true, "message": subs},
		"environment": map[string]any{"reproducible": false, "internet": false, "aleph_api": false, "shared_cache": false},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"volumes":     []any{},
	}, map[string]any{"channel": "PROGRAMS"})
}

func post(t *testing.T, channel, sender, body string) []byte {
	return build(t, "POST", sender, map[string]any{"type": "note", "content": map[string]any{"body": body}}, map[string]any{"channel": channel})
}

type recorder struct {
	mu     sync.Mutex
	events map[message.ItemHash][]string
}

func (r *recorder) Deliver(_ context.Context, ref message.ItemHash, event []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events[ref] = append(r.events[ref], string(event))
	return nil
}

func (r *recorder) count(ref message.ItemHash) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events[ref])
}

// feed serves frames on the reference's websocket route; every connection
// gets the frames given to it on connections (one slice per connection).
func feed(t *testing.T, connections [][][]byte) (*httptest.Server, chan string) {
	queries := make(chan string, 10)
	var mu sync.Mutex
	n := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/ws0/messages" {
			http.NotFound(w, r)
			return
		}
		queries <- r.URL.RawQuery
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		mu.Lock()
		var frames [][]byte
		if n < len(connections) {
			frames = connections[n]
		}
		n++
		mu.Unlock()
		for _, f := range frames {
			c.Write(r.Context(), websocket.MessageText, f)
		}
		if n >= len(connections) {
			<-r.Context().Done() // the last connection stays open
		}
		c.Close(websocket.StatusNormalClosure, "")
	}))
	t.Cleanup(srv.Close)
	return srv, queries
}

func TestReactorDeliversMatchingMessages(t *testing.T) {
	owner := "0x0000000000000000000000000000000000000001"
	prog := programWith(t, owner, []any{map[string]any{"channel": "EVENTS", "sender": "0x0000000000000000000000000000000000000002"}})
	var p struct {
		ItemHash message.ItemHash `json:"item_hash"`
	}
	json.Unmarshal(prog, &p)
	match := post(t, "EVENTS", "0x0000000000000000000000000000000000000002", "hello")
	forget := build(t, "FORGET", "0x0000000000000000000000000000000000000003", map[string]any{"hashes": []string{string(p.ItemHash)}}, nil)
	srv, queries := feed(t, [][][]byte{
		{prog, match, match, post(t, "OTHER", "0x0000000000000000000000000000000000000002", "no"), []byte(`{"confirmation":true}`), []byte("garbage"), forget},
		// A reconnection: the duplicate is not delivered again.
		{match, post(t, "EVENTS", "0x0000000000000000000000000000000000000002", "second")},
	})
	rec := &recorder{events: map[message.ItemHash][]string{}}
	r := New(Options{APIServer: srv.URL, Deliver: rec})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(5 * time.Second)
	for rec.count(p.ItemHash) < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if got := rec.events[p.ItemHash]; len(got) != 2 || got[0] != string(match) || !strings.Contains(got[1], "second") {
		t.Errorf("delivered %d: %v", len(got), got)
	}
	if first, second := <-queries, <-queries; !strings.HasPrefix(first, "startDate=") || second != "startDate=1699999940" {
		t.Errorf("feed queries %q then %q (a resumption starts a minute before the last message)", first, second)
	}
	if s := r.Stats(); s.Subscribers != 1 || s.Delivered != 2 {
		t.Errorf("stats %+v (a FORGET by someone else than the owner changes nothing)", s)
	}
}
