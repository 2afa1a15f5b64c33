package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// fakeQMP serves the QMP greeting and answers each command through
// handle, out of order when it likes.
func fakeQMP(t *testing.T, handle func(enc *json.Encoder, cmd string, id any)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		var mu sync.Mutex
		enc := json.NewEncoder(conn)
		enc.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{}, "capabilities": []string{}}})
		sc := bufio.NewScanner(conn)
		var wg sync.WaitGroup
		for sc.Scan() {
			var req struct {
				Execute string `json:"execute"`
				ID      any    `json:"id"`
			}
			json.Unmarshal(sc.Bytes(), &req)
			if req.Execute == "qmp_capabilities" {
				mu.Lock()
				enc.Encode(map[string]any{"return": map[string]any{}, "id": req.ID})
				mu.Unlock()
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				mu.Lock()
				defer mu.Unlock()
				handle(enc, req.Execute, req.ID)
			}()
		}
		wg.Wait()
	}()
	return sock
}

func TestQMPRepliesEventsAndErrors(t *testing.T) {
	sock := fakeQMP(t, func(enc *json.Encoder, cmd string, id any) {
		switch cmd {
		case "query-status":
			enc.Encode(map[string]any{"event": "RESUME", "data": map[string]any{}})
			enc.Encode(map[string]any{"return": map[string]any{"status": "running"}, "id": id})
		case "slow":
			time.Sleep(100 * time.Millisecond)
			enc.Encode(map[string]any{"return": map[string]any{}, "id": id})
		default:
			enc.Encode(map[string]any{"error": map[string]any{"class": "CommandNotFound", "desc": "The command " + cmd + " has not been found"}, "id": id})
		}
	})
	ctx := context.Background()
	q, err := DialQMP(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()

	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if st, err := q.Status(ctx); err != nil || st != "running" {
				t.Errorf("status %q %v", st, err)
			}
		}()
	}
	wg.Wait()
	if ev := <-q.Events(); ev.Name != "RESUME" {
		t.Errorf("event %+v", ev)
	}
	var qerr *QMPError
	if err := q.Execute(ctx, "nope", nil, nil); !errors.As(err, &qerr) || qerr.Class != "CommandNotFound" {
		t.Errorf("err = %v", err)
	}
	short, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	defer cancel()
	if err := q.Execute(short, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want a deadline", err)
	}
}

func TestQMPConnectionLossMeansVMGone(t *testing.T) {
	var conn chan struct{} = make(chan struct{})
	sock := fakeQMP(t, func(enc *json.Encoder, cmd string, id any) {
		close(conn) // never answer; the test closes the listener's side below
	})
	q, err := DialQMP(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- q.Execute(context.Background(), "hang", nil, nil) }()
	<-conn
	q.conn.Close() // as when QEMU exits
	select {
	case err := <-errc:
		if !errors.Is(err, ErrVMGone) {
			t.Errorf("err = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pending call not released")
	}
	<-q.Done()
	if err := q.Execute(context.Background(), "query-status", nil, nil); !errors.Is(err, ErrVMGone) {
		t.Errorf("after close: %v", err)
	}
}

func TestQMPBlockStats(t *testing.T) {
	// A reply of QEMU 7.2 for a qcow2 root over a raw base and a cdrom:
	// the backing layers' counters (parent, backing) are not the guest's.
	const reply = `[
	 {"device": "", "qdev": "/machine/peripheral/drive0/virtio-backend", "node-name": "root",
	  "stats": {"rd_bytes": 1000, "wr_bytes": 200, "rd_operations": 10, "wr_operations": 2, "flush_operations": 1},
	  "parent": {"node-name": "root-file", "stats": {"rd_bytes": 999999, "wr_bytes": 99999, "rd_operations": 99, "wr_operations": 9}},
	  "backing": {"node-name": "base", "stats": {"rd_bytes": 555555}}},
	 {"device": "", "qdev": "/machine/peripheral/drive1/virtio-backend", "node-name": "seed",
	  "stats": {"rd_bytes": 24, "wr_bytes": 0, "rd_operations": 3, "wr_operations": 0}}]`
	sock := fakeQMP(t, func(enc *json.Encoder, cmd string, id any) {
		if cmd != "query-blockstats" {
			enc.Encode(map[string]any{"error": map[string]any{"class": "CommandNotFound", "desc": cmd}, "id": id})
			return
		}
		enc.Encode(map[string]any{"return": json.RawMessage(reply), "id": id})
	})
	q, err := DialQMP(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	got, err := q.BlockStats(context.Background())
	if want := (BlockStats{ReadBytes: 1024, WriteBytes: 200, ReadOps: 13, WriteOps: 2}); err != nil || got != want {
		t.Errorf("got %+v %v, want %+v", got, err, want)
	}
}
