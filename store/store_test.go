package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/message"
)

// newTestStore opens a store and its database under dir with opts.
func newTestStore(t testing.TB, dir string, opts Options) *Store {
	t.Helper()
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	database, err := db.Open(ctx, db.Path(filepath.Join(dir, "state")), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { database.Close() })
	opts.Root, opts.DB, opts.Log = filepath.Join(dir, "cache"), database, log
	if opts.Backoff == 0 {
		opts.Backoff = time.Millisecond
	}
	s, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// storeMessage builds a STORE message for a file the way the network
// would hold it, with item_content and item_hash derived from content.
func storeMessage(t *testing.T, content map[string]any) (message.ItemHash, []byte) {
	t.Helper()
	content["address"] = cmpOr(content["address"], "0xowner")
	content["time"] = cmpOr(content["time"], 1700000000.5)
	content["item_type"] = cmpOr(content["item_type"], "storage")
	return newMessage(t, "STORE", content)
}

func cmpOr(v, def any) any {
	if v == nil {
		return def
	}
	return v
}

func newMessage(t *testing.T, typ string, content map[string]any) (message.ItemHash, []byte) {
	t.Helper()
	doc, _ := json.Marshal(map[string]any{
		"chain": "ETH", "sender": content["address"], "type": typ, "signature": "0xsig",
		"time": content["time"], "item_type": "inline", "content": content,
	})
	raw, err := message.Regenerate(doc)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := message.Parse(raw)
	if err != nil {
		t.Fatalf("test message does not validate: %v", err)
	}
	return msg.ItemHash, raw
}

// remoteFile puts a file and a STORE message naming it on the fake node.
func remoteFile(t *testing.T, core *fakeCore, data []byte) message.ItemHash {
	t.Helper()
	sum := message.SHA256Hex(data)
	core.addFile(sum, data)
	ref, raw := storeMessage(t, map[string]any{"item_hash": sum, "size": len(data)})
	core.addMessage(ref, raw)
	return ref
}

func checkItem(t *testing.T, item *Item, want []byte) {
	t.Helper()
	got, err := os.ReadFile(item.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) || item.Size != int64(len(want)) || item.SHA256 != message.SHA256Hex(want) {
		t.Errorf("item %s: %d bytes (want %d), sha256 %s", item.FileHash, len(got), len(want), item.SHA256)
	}
}

// checkClean fails if the store holds anything but the files it indexes.
func checkClean(t *testing.T, s *Store) {
	t.Helper()
	parts, _ := os.ReadDir(s.tmp)
	for _, p := range parts {
		t.Errorf("left in tmp/: %s", p.Name())
	}
	blobs, _ := os.ReadDir(s.files)
	var n int
	s.db.QueryRow(`SELECT COUNT(DISTINCT sha256) FROM store_files`).Scan(&n)
	if n != len(blobs) {
		t.Errorf("%d files on disk, %d indexed", len(blobs), n)
	}
}

func TestAddFileThenFetch(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := newTestStore(t, dir, Options{})
	data := randomBytes(t, 3<<20+17)
	path := filepath.Join(dir, "rootfs.squashfs")
	os.WriteFile(path, data, 0o644)

	added, err := s.AddFile(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if added.SHA256 != message.SHA256Hex(data) || added.Size != int64(len(data)) {
		t.Fatalf("added %+v", added)
	}
	again, err := s.AddFile(ctx, path)
	if err != nil || again.Ref != added.Ref {
		t.Errorf("adding the same bytes again gave %s (%v), want the same ref %s", again.Ref, err, added.Ref)
	}
	msg, raw, err := s.Message(ctx, added.Ref)
	if err != nil {
		t.Fatal(err)
	}
	c := msg.Content.(*message.StoreContent)
	if msg.Type != message.TypeStore || msg.Signature != nil || c.ItemHash != message.ItemHash(added.SHA256) || c.ItemType != message.ItemStorage {
		t.Errorf("local STORE message: %s", raw)
	}
	item, err := s.Fetch(ctx, added.Ref, true)
	if err != nil {
		t.Fatal(err)
	}
	defer item.Release()
	checkItem(t, item, data)
	if !item.Verified || item.Ref != added.Ref {
		t.Errorf("item %+v", item)
	}
	if st, _ := os.Stat(item.Path); st.Mode().Perm() != 0o444 {
		t.Errorf("stored file is %v, want read-only", st.Mode())
	}
	checkClean(t, s)
}

func TestAddMessage(t *testing.T) {
	ctx := context.Background()
	s := newTestStore(t, t.TempDir(), Options{})
	hash, raw := newMessage(t, "POST", map[string]any{"address": "0xa", "time": 1.5, "type": "note", "content": "hi"})
	if _, err := s.AddMessage(ctx, raw); err != nil {
		t.Fatal(err)
	}
	_, got, err := s.Message(ctx, hash)
	if err != nil || !bytes.Equal(got, raw) {
		t.Errorf("got %s, %v", got, err)
	}
	if _, err := s.Fetch(ctx, hash, false); !errors.Is(err, ErrNotStore) {
		t.Errorf("fetching a POST: %v, want ErrNotStore", err)
	}

	bad := bytes.Replace(raw, []byte(`"chain":"ETH"`), []byte(`"chain":"NOPE"`), 1)
	if _, err := s.AddMessage(ctx, bad); !errors.Is(err, ErrInvalidMessage) {
		t.Errorf("invalid message: %v", err)
	}
	var n int
	s.db.QueryRow(`SELECT COUNT(*) FROM store_messages`).Scan(&n)
	if n != 1 {
		t.Errorf("%d messages kept, want 1", n)
	}
	for _, h := range []message.ItemHash{message.ItemHash(message.SHA256Hex([]byte("none"))), "not-a-hash"} {
		if _, _, err := s.Message(ctx, h); !errors.Is(err, ErrNotFound) {
			t.Errorf("message %s: %v, want ErrNotFound", h, err)
		}
	}
}

func TestFetchRemote(t *testing.T) {
	ctx := context.Background()
	core := newFakeCore(t)
	s := newTestStore(t, t.TempDir(), Options{APIServer: core.URL, IPFSGateway: core.URL + "/ipfs"})
	data := randomBytes(t, 5<<20)
	ref := remoteFile(t, core, data)

	// 100 callers at once, while the server holds the file back: one download.
	core.gate = make(chan struct{})
	var wg sync.WaitGroup
	items := make([]*Item, 100)
	errs := make([]error, 100)
	for i := range items {
		wg.Go(func() { items[i], errs[i] = s.Fetch(ctx, ref, false) })
	}
	time.Sleep(200 * time.Millisecond)
	close(core.gate)
	wg.Wait()
	for i := range items {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		checkItem(t, items[i], data)
		items[i].Release()
	}
	if n := core.fileHits(message.SHA256Hex(data)); n != 1 {
		t.Errorf("%d downloads for 100 concurrent requests, want 1", n)
	}
	checkClean(t, s)

	// The message and the file are now local: no server needed.
	core.Close()
	item, err := s.Fetch(ctx, ref, false)
	if err != nil {
		t.Fatal(err)
	}
	checkItem(t, item, data)
	item.Release()
}

func TestSlowDownloadBlocksNoOtherItem(t *testing.T) {
	core := newFakeCore(t)
	s := newTestStore(t, t.TempDir(), Options{APIServer: core.URL})
	slowData, fastData := randomBytes(t, 1000), randomBytes(t, 1000)
	slow, fast := remoteFile(t, core, slowData), remoteFile(t, core, fastData)
	core.gate, core.gated = make(chan struct{}), message.SHA256Hex(slowData)
	slowDone := make(chan error, 1)
	go func() {
		item, err := s.Fetch(context.Background(), slow, false)
		if err == nil {
			item.Release()
		}
		slowDone <- err
	}()
	for core.fileHits(core.gated) == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	item, err := s.Fetch(context.Background(), fast, false)
	if err != nil {
		t.Fatal(err)
	}
	checkItem(t, item, fastData)
	item.Release()
	select {
	case err := <-slowDone:
		t.Fatalf("the slow download ended first: %v", err)
	default:
	}
	close(core.gate)
	if err := <-slowDone; err != nil {
		t.Fatal(err)
	}
}

func TestFetchRemoteFailures(t *testing.T) {
	data := make([]byte, 4<<20)
	rand.Read(data)
	cases := []struct {
		name      string
		sabotage  func(*fakeCore)
		attempts  int
		wantErr   error // nil: the fetch succeeds
		wantRange bool  // a retry resumed with a Range request
	}{
		{"corrupt bytes", func(c *fakeCore) { c.sabotaged, c.corrupt = 99, true }, 3, ErrHashMismatch, false},
		{"corrupt once", func(c *fakeCore) { c.sabotaged, c.corrupt = 1, true }, 3, ErrHashMismatch, false},
		{"drop mid-file twice", func(c *fakeCore) { c.sabotaged, c.cutAt = 2, 1<<20 }, 3, nil, true},
		{"drop mid-file always", func(c *fakeCore) { c.sabotaged, c.cutAt = 99, 1<<20 }, 3, ErrRemoteUnavailable, true},
		{"stall mid-file", func(c *fakeCore) { c.sabotaged, c.cutAt, c.stall = 1, 3<<20, true }, 3, nil, true},
		{"server errors", func(c *fakeCore) { c.status = 503 }, 2, ErrRemoteUnavailable, false},
		{"file missing", func(c *fakeCore) { c.status = 404 }, 3, ErrNotFound, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			core := newFakeCore(t)
			s := newTestStore(t, t.TempDir(), Options{APIServer: core.URL, Attempts: tc.attempts, StallTimeout: 300 * time.Millisecond})
			ref := remoteFile(t, core, data)
			tc.sabotage(core)
			item, err := s.Fetch(context.Background(), ref, false)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				checkItem(t, item, data)
				item.Release()
				checkClean(t, s)
			} else {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if blobs, _ := os.ReadDir(s.files); len(blobs) != 0 {
					t.Errorf("a file was stored despite %v", err)
				}
			}
			if resumed := len(core.ranges) > 0; resumed != tc.wantRange {
				t.Errorf("Range requests %q", core.ranges)
			}
		})
	}
}

func TestRestartMidDownload(t *testing.T) {
	core := newFakeCore(t)
	dir := t.TempDir()
	data := randomBytes(t, 4<<20)
	ref := remoteFile(t, core, data)
	core.sabotaged, core.cutAt, core.stall = 1, 3<<20, true

	s := newTestStore(t, dir, Options{APIServer: core.URL})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := s.Fetch(ctx, ref, false)
		done <- err
	}()
	part := filepath.Join(s.tmp, message.SHA256Hex(data)+".part")
	for st, err := os.Stat(part); err != nil || st.Size() < 3<<20; st, err = os.Stat(part) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel() // the node stops mid-download
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled fetch: %v", err)
	}

	s2 := newTestStore(t, dir, Options{APIServer: core.URL})
	item, err := s2.Fetch(context.Background(), ref, false)
	if err != nil {
		t.Fatal(err)
	}
	checkItem(t, item, data)
	item.Release()
	if len(core.ranges) != 1 || core.ranges[0] != fmt.Sprintf("bytes=%d-", 3<<20) {
		t.Errorf("Range requests %q, want one from the 3 MiB already there", core.ranges)
	}
	checkClean(t, s2)
}

func TestUseLatest(t *testing.T) {
	ctx := context.Background()
	core := newFakeCore(t)
	s := newTestStore(t, t.TempDir(), Options{APIServer: core.URL})
	v1, v2, v3 := randomBytes(t, 1000), randomBytes(t, 2000), randomBytes(t, 3000)
	orig := remoteFile(t, core, v1)
	amend := func(data []byte, owner string, at float64) message.ItemHash {
		sum := message.SHA256Hex(data)
		core.addFile(sum, data)
		h, raw := storeMessage(t, map[string]any{"item_hash": sum, "ref": string(orig), "address": owner, "time": at})
		core.addMessage(h, raw)
		return h
	}
	a2 := amend(v2, "0xowner", 1700000100)
	amend(v3, "0xsomeone-else", 1700000200) // not the owner: ignored

	for _, tc := range []struct {
		useLatest bool
		ref       message.ItemHash
		want      []byte
	}{{false, orig, v1}, {true, a2, v2}} {
		item, err := s.Fetch(ctx, orig, tc.useLatest)
		if err != nil {
			t.Fatal(err)
		}
		if item.Ref != tc.ref {
			t.Errorf("use_latest=%v resolved to %s, want %s", tc.useLatest, item.Ref, tc.ref)
		}
		checkItem(t, item, tc.want)
		item.Release()
	}

	// A newer amend kept locally wins over the API's.
	v4 := randomBytes(t, 4000)
	a4 := amend(v4, "0xowner", 1700000300)
	_, raw, _ := s.Message(ctx, a4)
	core.mu.Lock()
	delete(core.messages, a4)
	core.mu.Unlock()
	if _, err := s.AddMessage(ctx, raw); err != nil {
		t.Fatal(err)
	}
	item, err := s.Fetch(ctx, orig, true)
	if err != nil || item.Ref != a4 {
		t.Fatalf("latest = %v, %v; want the local amend %s", item, err, a4)
	}
	item.Release()
}

func TestIPFSUnverified(t *testing.T) {
	core := newFakeCore(t)
	s := newTestStore(t, t.TempDir(), Options{APIServer: core.URL, IPFSGateway: core.URL + "/ipfs"})
	data := randomBytes(t, 1000)
	cid := "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
	core.addFile(cid, data)
	ref, raw := storeMessage(t, map[string]any{"item_hash": cid, "item_type": "ipfs"})
	core.addMessage(ref, raw)
	item, err := s.Fetch(context.Background(), ref, false)
	if err != nil {
		t.Fatal(err)
	}
	defer item.Release()
	checkItem(t, item, data)
	if item.Verified {
		t.Error("an IPFS item is reported verified")
	}
}

func TestEviction(t *testing.T) {
	ctx := context.Background()
	core := newFakeCore(t)
	dir := t.TempDir()
	s := newTestStore(t, dir, Options{APIServer: core.URL, MaxSize: 2500})
	local := filepath.Join(dir, "local")
	os.WriteFile(local, randomBytes(t, 5000), 0o644)
	if _, err := s.AddFile(ctx, local); err != nil { // over the limit alone, never evicted
		t.Fatal(err)
	}
	fetch := func(ref message.ItemHash) *Item {
		t.Helper()
		item, err := s.Fetch(ctx, ref, false)
		if err != nil {
			t.Fatal(err)
		}
		return item
	}
	a, b, c := remoteFile(t, core, randomBytes(t, 1000)), remoteFile(t, core, randomBytes(t, 1000)), remoteFile(t, core, randomBytes(t, 1000))
	pinned := fetch(a) // in use by a VM
	fetch(b).Release()
	fetch(c).Release() // b, the least recently used, goes; a is pinned
	stored := func(ref message.ItemHash) bool {
		msg, _, _ := s.Message(ctx, ref)
		var n int
		s.db.QueryRow(`SELECT COUNT(*) FROM store_files WHERE item_hash = ?`, msg.Content.(*message.StoreContent).ItemHash).Scan(&n)
		return n == 1
	}
	if !stored(a) || stored(b) || !stored(c) {
		t.Errorf("after the limit: a %v, b %v, c %v; want a and c kept", stored(a), stored(b), stored(c))
	}

	res, err := s.GC(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if res.Evicted != 1 || res.InUse != 1 || !stored(a) || stored(c) || res.Size != 6000 {
		t.Errorf("gc: %+v", res)
	}
	checkItem(t, pinned, pinned.readBack(t))
	pinned.Release()
	if res, _ := s.GC(ctx, 1); res.Evicted != 1 || res.Size != 5000 {
		t.Errorf("gc after release: %+v", res)
	}
	checkClean(t, s)
}

func (it *Item) readBack(t *testing.T) []byte {
	data, err := os.ReadFile(it.Path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestGCRemovesLeftovers(t *testing.T) {
	ctx := context.Background()
	s := newTestStore(t, t.TempDir(), Options{})
	old := filepath.Join(s.tmp, message.SHA256Hex([]byte("x"))+".part")
	recent := filepath.Join(s.tmp, message.SHA256Hex([]byte("y"))+".part")
	for _, p := range []string{old, recent, filepath.Join(s.tmp, "add-1.part"), s.blobPath(message.SHA256Hex([]byte("orphan")))} {
		os.WriteFile(p, []byte("data"), 0o644)
	}
	os.Chtimes(old, time.Now().Add(-2*DefaultPartMaxAge), time.Now().Add(-2*DefaultPartMaxAge))
	res, err := s.GC(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if res.Parts != 2 || res.Orphans != 1 || res.Freed != 12 {
		t.Errorf("gc: %+v", res)
	}
	if _, err := os.Stat(recent); err != nil {
		t.Errorf("a recent .part, still resumable, was removed")
	}
}

func TestRemoteMessageChecks(t *testing.T) {
	ctx := context.Background()
	core := newFakeCore(t)
	s := newTestStore(t, t.TempDir(), Options{APIServer: core.URL})
	good, raw := newMessage(t, "POST", map[string]any{"address": "0xa", "time": 1.5, "type": "note"})
	other, otherRaw := newMessage(t, "POST", map[string]any{"address": "0xb", "time": 2.5, "type": "note"})
	core.addMessage(good, raw)
	wrong := message.ItemHash(message.SHA256Hex([]byte("wrong")))
	core.addMessage(wrong, otherRaw) // the API answers another message
	invalid := message.ItemHash(message.SHA256Hex([]byte("invalid")))
	core.addMessage(invalid, []byte(`{"chain":"ETH"}`))

	if _, got, err := s.Message(ctx, good); err != nil || !bytes.Equal(got, raw) {
		t.Errorf("good: %v", err)
	}
	for hash, want := range map[message.ItemHash]error{
		wrong:   ErrHashMismatch,
		invalid: ErrInvalidMessage,
		message.ItemHash(message.SHA256Hex([]byte("absent"))): ErrNotFound,
	} {
		if _, _, err := s.Message(ctx, hash); !errors.Is(err, want) {
			t.Errorf("%s: %v, want %v", hash, err, want)
		}
	}
	var n int
	s.db.QueryRow(`SELECT COUNT(*) FROM store_messages WHERE item_hash = ?`, other).Scan(&n)
	if n != 0 {
		t.Error("a message that answered for another hash was kept")
	}
}

// countingEvents counts what the store tells the node's metrics.
type countingEvents struct {
	mu                              sync.Mutex
	started, failed, inFlight, peak int
	received                        int64
	evicted                         int
	evictedBytes                    int64
}

func (e *countingEvents) DownloadStarted() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.started++
	e.inFlight++
	e.peak = max(e.peak, e.inFlight)
}

func (e *countingEvents) DownloadEnded(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.inFlight--
	if err != nil {
		e.failed++
	}
}

func (e *countingEvents) DownloadReceived(n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.received += int64(n)
}

func (e *countingEvents) Evicted(size int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.evicted++
	e.evictedBytes += size
}

func TestEventsOfDownloadsAndEvictions(t *testing.T) {
	ctx := context.Background()
	core := newFakeCore(t)
	ev := &countingEvents{}
	s := newTestStore(t, t.TempDir(), Options{APIServer: core.URL, MaxSize: 2500, Attempts: 2, Events: ev})
	a, b := remoteFile(t, core, randomBytes(t, 1000)), remoteFile(t, core, randomBytes(t, 2000))
	// Ten callers of one file: one download.
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			if item, err := s.Fetch(ctx, a, false); err == nil {
				item.Release()
			}
		})
	}
	wg.Wait()
	item, err := s.Fetch(ctx, b, false) // a, not in use, is evicted
	if err != nil {
		t.Fatal(err)
	}
	item.Release()
	core.status = 503
	if _, err := s.Fetch(ctx, a, false); err == nil {
		t.Fatal("fetched from a failing server")
	}
	size, err := s.Size(ctx)
	if err != nil || size != 2000 {
		t.Errorf("size %d %v", size, err)
	}
	ev.mu.Lock()
	defer ev.mu.Unlock()
	if ev.started != 3 || ev.failed != 1 || ev.inFlight != 0 || ev.received != 3000 || ev.evicted != 1 || ev.evictedBytes != 1000 {
		t.Errorf("events: %+v", ev)
	}
}
