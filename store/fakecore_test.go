package store

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/alephvm/alephvm/message"
)

// fakeCore serves the API shapes of an Aleph core node and an IPFS
// gateway on 127.0.0.1, and misbehaves on demand.
type fakeCore struct {
	*httptest.Server
	mu       sync.Mutex
	messages map[message.ItemHash][]byte
	files    map[string][]byte // by item hash: sha256 or CID
	cars     map[string]car    // CAR streams of IPFS items, by CID
	hits     map[string]int    // file GETs by item hash
	ranges   []string          // Range headers received
	// The first sabotaged requests for a file misbehave: they corrupt a
	// byte, or stop after sending cutAt bytes and drop the connection,
	// after stalling until the client goes if stall is set.
	sabotaged int
	corrupt   bool
	cutAt     int64
	stall     bool
	noLength  bool          // files are sent without Content-Length
	status    int           // if set, every file request answers it
	gate      chan struct{} // if set, file requests wait for it to close
	gated     string        // if set, only requests for this item wait
}

func newFakeCore(t *testing.T) *fakeCore {
	f := &fakeCore{messages: map[message.ItemHash][]byte{}, files: map[string][]byte{}, cars: map[string]car{}, hits: map[string]int{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v0/messages/{hash}", f.message)
	mux.HandleFunc("GET /api/v0/messages.json", f.listMessages)
	mux.HandleFunc("GET /api/v0/storage/raw/{hash}", f.file)
	mux.HandleFunc("GET /ipfs/{hash}", f.file)
	f.Server = httptest.NewServer(mux)
	t.Cleanup(f.Close)
	return f
}

func (f *fakeCore) addMessage(hash message.ItemHash, raw []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.messages[hash] = raw
}

func (f *fakeCore) addFile(hash string, data []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.files[hash] = data
}

// car is a CAR stream as a trustless gateway serves it.
type car struct {
	body []byte
	dups bool // every block in traversal order, duplicates included
}

func (f *fakeCore) addCAR(cid string, c car) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cars[cid] = c
}

func (f *fakeCore) fileHits(hash string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hits[hash]
}

func (f *fakeCore) message(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	raw, ok := f.messages[message.ItemHash(r.PathValue("hash"))]
	f.mu.Unlock()
	if !ok {
		http.Error(w, `{"error":"Message not found"}`, http.StatusNotFound)
		return
	}
	fmt.Fprintf(w, `{"status":"processed","item_hash":%q,"reception_time":"2026-11-23T00:00:00Z","message":%s}`, r.PathValue("hash"), raw)
}

// listMessages answers the two queries the store makes: by hashes, and the
// latest STORE amends of refs by owners, newest first.
func (f *fakeCore) listMessages(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f.mu.Lock()
	var found []*message.Message
	raws := map[*message.Message][]byte{}
	for hash, raw := range f.messages {
		msg, err := message.Parse(raw)
		if err != nil {
			panic(err)
		}
		c, _ := msg.Content.(*message.StoreContent)
		switch {
		case q.Has("hashes") && slices.Contains(strings.Split(q.Get("hashes"), ","), string(hash)):
		case q.Has("refs") && c != nil && c.Ref != nil && *c.Ref == q.Get("refs") && q.Get("msgType") == "STORE":
			if q.Has("owners") && c.Address != q.Get("owners") {
				continue
			}
		default:
			continue
		}
		found = append(found, msg)
		raws[msg] = raw
	}
	f.mu.Unlock()
	slices.SortFunc(found, func(a, b *message.Message) int { return b.Time.Compare(a.Time) })
	list := make([]json.RawMessage, len(found))
	for i, m := range found {
		list[i] = raws[m]
	}
	json.NewEncoder(w).Encode(map[string]any{"messages": list, "pagination_page": 1, "pagination_total": len(list), "pagination_per_page": 20, "pagination_item": "messages"})
}

func (f *fakeCore) file(w http.ResponseWriter, r *http.Request) {
	hash := r.PathValue("hash")
	f.mu.Lock()
	data, ok := f.files[hash]
	car, isCAR := f.cars[hash]
	f.hits[hash]++
	if rng := r.Header.Get("Range"); rng != "" {
		f.ranges = append(f.ranges, rng)
	}
	sabotage := f.sabotaged > 0
	if sabotage {
		f.sabotaged--
	}
	corrupt, cutAt, stall, status, gate, noLength := f.corrupt, f.cutAt, f.stall, f.status, f.gate, f.noLength
	gated := f.gated == "" || f.gated == hash
	f.mu.Unlock()
	if gate != nil && gated {
		<-gate
	}
	if isCAR && r.URL.Query().Get("format") == "car" {
		data, ok = car.body, true
		dups := map[bool]string{true: "y", false: "n"}[car.dups]
		w.Header().Set("Content-Type", "application/vnd.ipld.car; version=1; order=dfs; dups="+dups)
	}
	switch {
	case status != 0:
		http.Error(w, http.StatusText(status), status)
		return
	case !ok:
		http.NotFound(w, r)
		return
	}
	start := int64(0)
	if rng, ok := strings.CutPrefix(r.Header.Get("Range"), "bytes="); ok {
		start, _ = strconv.ParseInt(strings.TrimSuffix(rng, "-"), 10, 64)
		if start >= int64(len(data)) {
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		}
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, len(data)-1, len(data)))
		if !noLength {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)-int(start)))
		}
		w.WriteHeader(http.StatusPartialContent)
	} else if !noLength {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	}
	body := data[start:]
	if sabotage && corrupt {
		body = slices.Clone(body)
		body[len(body)/2] ^= 0xff
	}
	if sabotage && cutAt > 0 && cutAt < int64(len(body)) {
		w.Write(body[:cutAt])
		w.(http.Flusher).Flush()
		if stall {
			<-r.Context().Done()
		}
		panic(http.ErrAbortHandler) // drop the connection mid-file
	}
	if noLength { // in pieces, so that the length is not known ahead
		for len(body) > 0 {
			n := min(len(body), 64<<10)
			w.Write(body[:n])
			w.(http.Flusher).Flush()
			body = body[n:]
		}
		return
	}
	w.Write(body)
}
