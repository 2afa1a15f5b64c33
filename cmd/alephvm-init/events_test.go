package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestEventWrapper runs the real event wrapper under the host's python3
// with a program that records what it is called with, and delivers an
// event through the init's DeliverEvent: the program gets the reference's
// event scope and body; an HTTP call stays HTTP.
func TestEventWrapper(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3")
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "alephvm_events.py"), eventWrapper, 0o644)
	os.WriteFile(filepath.Join(dir, "main.py"), []byte(`
seen = []
async def app(scope, receive, send):
    message = await receive()
    seen.append((scope["type"], message["type"], message.get("body")))
    if scope["type"] == "aleph.message" and "fail" in message["body"]:
        raise RuntimeError("the app failed")
`), 0o644)
	sock := filepath.Join(dir, "events.sock")
	// A driver: import the wrapper as uvicorn would, call it once over
	// HTTP (which starts its event socket), then wait for events and
	// print what the program saw.
	driver := `
import asyncio, sys
import alephvm_events, main
async def run():
    async def receive(): return {"type": "http.request", "body": b"x", "more_body": False}
    async def send(m): pass
    await alephvm_events.app({"type": "http"}, receive, send)
    print("listening", flush=True)
    while len(main.seen) < 3:
        await asyncio.sleep(0.02)
    for s in main.seen: print(s, flush=True)
asyncio.run(run())
`
	cmd := exec.Command(python, "-c", driver)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PYTHONPATH="+dir, "ALEPHVM_ASGI_APP=main:app", "ALEPHVM_EVENTS_SOCKET="+sock)
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), "listening"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the wrapper did not start: %s", out)
		}
	}
	deliver := func(body string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return deliverTo(ctx, sock, []byte(body))
	}

	if err := deliver(`{"item_hash":"ab","channel":"EVENTS"}`); err != nil {
		t.Fatalf("deliver: %v", err)
	}
	if err := deliver(`{"fail":true}`); err == nil || !strings.Contains(err.Error(), "RuntimeError: the app failed") {
		t.Errorf("an event the app fails: %v", err)
	}
	cmd.Wait()
	want := []string{
		"('http', 'http.request', b'x')",
		`('aleph.message', 'aleph.message', '{"item_hash":"ab","channel":"EVENTS"}')`,
		`('aleph.message', 'aleph.message', '{"fail":true}')`,
	}
	for _, w := range want {
		if !strings.Contains(out.String(), w) {
			t.Errorf("the program did not see %s:\n%s", w, out)
		}
	}
}

func TestDeliverRefusesWithoutEvents(t *testing.T) {
	in := newInit()
	if err := in.DeliverEvent(context.Background(), []byte("{}")); err == nil {
		t.Error("an init whose program takes no events took one")
	}
}
