package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAssetsFetchAndList(t *testing.T) {
	body := []byte("a pinned file")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	defer srv.Close()
	sum := sha256.Sum256(body)
	dir := t.TempDir()
	manifest := filepath.Join(dir, "fetch.json")
	os.WriteFile(manifest, fmt.Appendf(nil, `{"files": [{"name": "tool", "url": %q, "sha256": %q}]}`, srv.URL+"/tool", hex.EncodeToString(sum[:])), 0o644)
	env := []string{"ALEPH_VM_ASSETS_DIR=" + filepath.Join(dir, "assets")}

	code, out, errOut := runCLI(t, env, "assets", "list")
	if code != 0 || strings.Count(out, "\n") != 1 {
		t.Errorf("empty list: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = runCLI(t, env, "assets", "fetch", manifest)
	if code != 0 || !strings.Contains(out, "fetched/tool") || !strings.Contains(errOut, "sha256 verified") {
		t.Errorf("fetch: exit %d\n%s%s", code, out, errOut)
	}
	code, out, _ = runCLI(t, env, "assets", "list")
	if code != 0 || !strings.Contains(out, hex.EncodeToString(sum[:])) || !strings.Contains(out, filepath.Join(dir, "assets", "fetched", "tool")) {
		t.Errorf("list after fetch: exit %d\n%s", code, out)
	}

	os.WriteFile(manifest, []byte(`{"files": [{"name": "tool", "url": "ftp://x", "sha256": "00"}]}`), 0o644)
	if code, _, errOut := runCLI(t, env, "assets", "fetch", manifest); code != 1 || !strings.Contains(errOut, "files[0].url") {
		t.Errorf("bad manifest: exit %d, %s", code, errOut)
	}
}

func TestAssetsBuildNeedsInit(t *testing.T) {
	env := []string{"ALEPH_VM_ASSETS_DIR=" + t.TempDir(), "PATH=" + t.TempDir()}
	code, _, errOut := runCLI(t, env, "assets", "build", "--init", filepath.Join(t.TempDir(), "missing"), "--skip-runtime")
	if code != 1 || errOut == "" {
		t.Errorf("exit %d, %s", code, errOut)
	}
}

// TestFindInit finds the init beside alephvm (a build tree) and where the
// Debian package installs it, and says where it looked when it is in
// neither place.
func TestFindInit(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	root := t.TempDir()
	self := filepath.Join(root, "usr", "bin", "alephvm")
	packaged := filepath.Join(root, "usr", "lib", "alephvm", "alephvm-init")
	if _, err := findInitFrom(self); err == nil || !strings.Contains(err.Error(), "../lib/alephvm/") {
		t.Errorf("no init anywhere: %v", err)
	}
	os.MkdirAll(packaged, 0o755) // a directory of that name is not the init
	if p, err := findInitFrom(self); err == nil {
		t.Errorf("took the directory %s", p)
	}
	os.Remove(packaged)
	os.WriteFile(packaged, []byte("init"), 0o755)
	if p, err := findInitFrom(self); err != nil || p != packaged {
		t.Errorf("packaged: %q %v", p, err)
	}
	beside := filepath.Join(root, "usr", "bin", "alephvm-init")
	os.MkdirAll(filepath.Dir(beside), 0o755)
	os.WriteFile(beside, []byte("init"), 0o755)
	if p, err := findInitFrom(self); err != nil || p != beside {
		t.Errorf("beside: %q %v", p, err)
	}
}
