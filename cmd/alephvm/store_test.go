package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
)

func TestStoreAddGet(t *testing.T) {
	dir := t.TempDir()
	environ := []string{"ALEPH_VM_CACHE_ROOT=" + filepath.Join(dir, "cache"), "ALEPH_VM_EXECUTION_ROOT=" + filepath.Join(dir, "state")}
	data := bytes.Repeat([]byte("runtime "), 100000)
	in := filepath.Join(dir, "runtime.squashfs")
	os.WriteFile(in, data, 0o644)

	code, out, errOut := runCLI(t, environ, "store", "add", in)
	fields := strings.Fields(out)
	if code != 0 || len(fields) != 6 || fields[0] != "ref" || fields[3] != message.SHA256Hex(data) {
		t.Fatalf("store add: exit %d\n%s%s", code, out, errOut)
	}
	ref := fields[1]

	outFile := filepath.Join(dir, "out")
	if code, _, errOut := runCLI(t, environ, "store", "get", ref, "-o", outFile); code != 0 {
		t.Fatalf("store get: exit %d: %s", code, errOut)
	}
	if got, _ := os.ReadFile(outFile); !bytes.Equal(got, data) {
		t.Error("store get wrote other bytes")
	}

	code, raw, _ := runCLI(t, environ, "message", "get", ref)
	msg, err := message.Parse([]byte(raw))
	if code != 0 || err != nil || msg.Type != message.TypeStore || string(msg.ItemHash) != ref {
		t.Fatalf("message get: exit %d, %v\n%s", code, err, raw)
	}

	// A message kept by another node's store is accepted by message add.
	other := []string{"ALEPH_VM_CACHE_ROOT=" + filepath.Join(dir, "cache2"), "ALEPH_VM_EXECUTION_ROOT=" + filepath.Join(dir, "state2")}
	msgFile := filepath.Join(dir, "store.json")
	os.WriteFile(msgFile, []byte(raw), 0o644)
	if code, out, errOut := runCLI(t, other, "message", "add", msgFile); code != 0 || out != "STORE "+ref+"\n" {
		t.Errorf("message add: exit %d: %s%s", code, out, errOut)
	}
	// That store has the message but not the file, and no API server.
	if code, _, errOut := runCLI(t, other, "store", "get", ref, "-o", outFile); code != 1 || !strings.Contains(errOut, "not found") {
		t.Errorf("store get without the file: exit %d: %s", code, errOut)
	}

	if code, out, _ := runCLI(t, environ, "store", "gc", "--max-size", "1"); code != 0 || !strings.Contains(out, "evicted 0 files") {
		t.Errorf("store gc: exit %d: %s", code, out)
	}
}

func TestStoreErrors(t *testing.T) {
	dir := t.TempDir()
	environ := []string{"ALEPH_VM_CACHE_ROOT=" + filepath.Join(dir, "cache"), "ALEPH_VM_EXECUTION_ROOT=" + filepath.Join(dir, "state")}
	fixture, err := os.ReadFile(filepath.Join(testenv.SharedDir(t), "fixtures", "aleph-message", "forget.json"))
	if err != nil {
		t.Fatal(err)
	}
	forget, err := message.Regenerate(fixture)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "forget.json")
	os.WriteFile(file, forget, 0o644)
	code, out, errOut := runCLI(t, environ, "message", "add", file)
	if code != 0 || !strings.HasPrefix(out, "FORGET ") {
		t.Fatalf("message add: exit %d: %s%s", code, out, errOut)
	}
	hash := strings.Fields(out)[1]

	os.WriteFile(file, fixture, 0o644) // item_hash no longer matches
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"ref of a FORGET", []string{"store", "get", hash, "-o", filepath.Join(dir, "x")}, "not a STORE message"},
		{"no output", []string{"store", "get", hash}, "-o FILE"},
		{"invalid message", []string{"message", "add", file}, "invalid message: item_hash"},
		{"unknown message", []string{"message", "get", message.SHA256Hex(nil)}, "not found"},
		{"missing file", []string{"store", "add", filepath.Join(dir, "missing")}, "no such file"},
		{"bad size", []string{"store", "gc", "--max-size", "lots"}, "--max-size"},
	}
	for _, tc := range cases {
		if code, _, errOut := runCLI(t, environ, tc.args...); code != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("%s: exit %d: %s", tc.name, code, errOut)
		}
	}
}
