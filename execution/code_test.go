package execution

import (
	"archive/zip"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
)

func writeZip(t *testing.T, path string, entries map[string]string, symlink string) {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range entries {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte(body))
	}
	if symlink != "" {
		h := &zip.FileHeader{Name: symlink}
		h.SetMode(os.ModeSymlink | 0o777)
		w, _ := zw.CreateHeader(h)
		w.Write([]byte("/etc/passwd"))
	}
	zw.Close()
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func listSquashfs(t *testing.T, path string) string {
	t.Helper()
	return testenv.Cmd(t, "unsquashfs", "-l", "-d", "", path)
}

func TestSquashfsOfCode(t *testing.T) {
	testenv.RequireTools(t, "mksquashfs", "unsquashfs")
	ctx := context.Background()
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")

	src := filepath.Join(dir, "code.zip")
	writeZip(t, src, map[string]string{"main.py": "app = None\n", "pkg/mod.py": "x = 1\n", "pkg/": ""}, "")
	out, err := Squashfs(ctx, cache, src, "aaaa", message.EncodingZip, "")
	if err != nil {
		t.Fatal(err)
	}
	if l := listSquashfs(t, out); !strings.Contains(l, "/main.py") || !strings.Contains(l, "/pkg/mod.py") {
		t.Errorf("listing:\n%s", l)
	}
	if again, err := Squashfs(ctx, cache, src, "aaaa", message.EncodingZip, ""); err != nil || again != out {
		t.Errorf("not cached: %s %v", again, err)
	}

	plain := filepath.Join(dir, "server")
	os.WriteFile(plain, []byte("#!/bin/sh\n"), 0o644)
	out, err = Squashfs(ctx, cache, plain, "bbbb", message.EncodingPlain, "server")
	if err != nil {
		t.Fatal(err)
	}
	if l := listSquashfs(t, out); !strings.Contains(l, "/server") {
		t.Errorf("listing:\n%s", l)
	}

	if out, err := Squashfs(ctx, cache, src, "cccc", message.EncodingSquashfs, ""); err != nil || out != src {
		t.Errorf("squashfs not passed through: %s %v", out, err)
	}

	for name, entries := range map[string]map[string]string{
		"slip":     {"../../etc/cron.d/x": "boom"},
		"absolute": {"/etc/passwd": "boom"},
	} {
		bad := filepath.Join(dir, name+".zip")
		writeZip(t, bad, entries, "")
		if _, err := Squashfs(ctx, cache, bad, name, message.EncodingZip, ""); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	link := filepath.Join(dir, "link.zip")
	writeZip(t, link, map[string]string{"a": "b"}, "evil")
	if _, err := Squashfs(ctx, cache, link, "link", message.EncodingZip, ""); err == nil {
		t.Error("symlink entry accepted")
	}
	if _, err := Squashfs(ctx, cache, plain, "dddd", message.EncodingPlain, "../x"); err == nil {
		t.Error("plain name with a slash accepted")
	}
	leftovers, _ := filepath.Glob(filepath.Join(cache, ".unpack-*"))
	if len(leftovers) != 0 {
		t.Errorf("left behind: %v", leftovers)
	}
}
