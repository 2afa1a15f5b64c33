package store

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/alephvm/alephvm/message"
)

func TestSweepCollectsAbandonedParts(t *testing.T) {
	s := newTestStore(t, t.TempDir(), Options{PartMaxAge: time.Hour})
	abandoned := filepath.Join(s.tmp, message.SHA256Hex([]byte("abandoned"))+".part")
	recent := filepath.Join(s.tmp, message.SHA256Hex([]byte("recent"))+".part")
	writing := filepath.Join(s.tmp, message.SHA256Hex([]byte("writing"))+".part")
	for _, p := range []string{abandoned, recent, writing} {
		if err := os.WriteFile(p, make([]byte, 1000), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	os.Chtimes(abandoned, old, old)
	os.Chtimes(writing, old, old)
	held, err := os.Open(writing) // a download under way holds its lock
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := lockExclusive(context.Background(), held); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Sweep(ctx, 20*time.Millisecond)
		close(done)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for _, err := os.Stat(abandoned); err == nil; _, err = os.Stat(abandoned) {
		if time.Now().After(deadline) {
			t.Fatal("the sweep did not remove an abandoned .part")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Sweep does not return when its context ends")
	}
	for _, kept := range []string{recent, writing} {
		if _, err := os.Stat(kept); err != nil {
			t.Errorf("%s: %v", filepath.Base(kept), err)
		}
	}
}

func TestGCForgetsUnusedMessages(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := newTestStore(t, dir, Options{MessageMaxAge: time.Hour})
	keep := func(content map[string]any) message.ItemHash {
		t.Helper()
		hash, raw := storeMessage(t, content)
		msg, err := message.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.saveMessage(ctx, msg, raw, false); err != nil {
			t.Fatal(err)
		}
		return hash
	}
	sum := func(s string) string { return message.SHA256Hex([]byte(s)) }

	unused := keep(map[string]any{"item_hash": sum("unused")})
	young := keep(map[string]any{"item_hash": sum("young")})
	code := keep(map[string]any{"item_hash": sum("code")})
	runtime := keep(map[string]any{"item_hash": sum("runtime")})
	amend := keep(map[string]any{"item_hash": sum("runtime v2"), "ref": string(runtime), "time": 1700000001.0})
	path := filepath.Join(dir, "cached")
	os.WriteFile(path, []byte("cached"), 0o644)
	added, err := s.AddFile(ctx, path) // a local message, and a cached file
	if err != nil {
		t.Fatal(err)
	}
	cached := keep(map[string]any{"item_hash": added.SHA256})
	program := programMessage(t, s, code, runtime)
	orphanProgram := programMessage(t, s, unused, unused)
	if _, err := s.db.Exec(`INSERT INTO executions (item_hash, kind, state, hypervisor, vcpus, memory_mib, created_at)
		VALUES (?, 'program', 'stopped', 'qemu', 1, 128, 0)`, program); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-2 * time.Hour).UnixNano()
	if _, err := s.db.Exec(`UPDATE store_messages SET stored_at = ? WHERE item_hash != ?`, old, young); err != nil {
		t.Fatal(err)
	}

	res, err := s.GC(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	for hash, want := range map[message.ItemHash]bool{
		unused: false, orphanProgram: false,
		young: true, program: true, code: true, runtime: true, amend: true, cached: true, added.Ref: true,
	} {
		var n int
		s.db.QueryRow(`SELECT COUNT(*) FROM store_messages WHERE item_hash = ?`, hash).Scan(&n)
		if (n == 1) != want {
			t.Errorf("message %s kept: %v, want %v", hash, n == 1, want)
		}
	}
	if res.Messages != 2 {
		t.Errorf("gc: %+v, want 2 messages forgotten", res)
	}
}

// programMessage keeps a PROGRAM message running code on runtime.
func programMessage(t *testing.T, s *Store, code, runtime message.ItemHash) message.ItemHash {
	t.Helper()
	hash, raw := newMessage(t, "PROGRAM", map[string]any{
		"address": "0xowner", "time": 1700000000.5, "allow_amend": false, "type": "vm-function",
		"code":        map[string]any{"encoding": "zip", "entrypoint": "main:app", "ref": string(code), "use_latest": false},
		"runtime":     map[string]any{"ref": string(runtime), "use_latest": true, "comment": ""},
		"on":          map[string]any{"http": true},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"environment": map[string]any{"reproducible": false, "internet": false, "aleph_api": false, "shared_cache": false},
		"volumes":     []any{},
	})
	msg, err := message.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.saveMessage(context.Background(), msg, raw, false); err != nil {
		t.Fatal(err)
	}
	return hash
}
