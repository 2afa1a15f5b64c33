package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

// TestVolumeParentEndToEnd: a program's persistent volume with a parent
// shows the parent's files, and keeps what the guest wrote across a stop
// and a start.
func TestVolumeParentEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a program VM under emulation")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "nft", "mkfs.ext4", "go")
	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	env = append(env, "ALEPH_VM_ASSETS_DIR="+testassets.ProgramAssets(t), "ALEPH_VM_INIT_TIMEOUT=180")
	node := startNode(t, env, port)

	files := filepath.Join(dir, "parent-files")
	os.MkdirAll(files, 0o755)
	os.WriteFile(filepath.Join(files, "seed"), []byte("from the parent\n"), 0o644)
	parent := filepath.Join(dir, "parent.ext4")
	os.WriteFile(parent, nil, 0o644)
	os.Truncate(parent, 8<<20)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", files, parent).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	code, out, errOut := runCLI(t, env, "store", "add", parent)
	if code != 0 {
		t.Fatalf("store add: %s %s", out, errOut)
	}
	parentRef := strings.Fields(out)[1]

	progDir := filepath.Join(dir, "chaosprog")
	build := exec.Command("go", "build", "-o", filepath.Join(progDir, "chaosprog"), "./testdata/chaosprog")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	code, out, errOut = runCLI(t, env, "program", "create", progDir, "--entrypoint", "chaosprog", "--interface", "binary",
		"--memory", "128", "--volume", "mount=/data,name=data,size=32,parent="+parentRef)
	if code != 0 {
		t.Fatalf("program create: %s %s", out, errOut)
	}
	ref := strings.Fields(out)[0]
	get := func(path string) (int, string) {
		t.Helper()
		status, body := httpGet(t, programURL(port, ref, path))
		return status, body
	}
	if status, body := get("/read?name=seed"); status != 200 || body != "from the parent\n" {
		t.Fatalf("the parent's file: %d %q\n%s", status, body, node.logs.String())
	}
	if status, body := get("/write?name=mine"); status != 200 {
		t.Fatalf("write: %d %q", status, body)
	}
	if status, body := operatorPost(t, fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/stop", port, ref)); status != 200 {
		t.Fatalf("stop: %d %s", status, body)
	}
	for _, name := range []string{"seed", "mine"} {
		if status, body := get("/read?name=" + name); status != 200 || !strings.Contains(body, map[string]string{"seed": "from the parent", "mine": "chaos mine"}[name]) {
			t.Errorf("after a stop and a start, %s: %d %q", name, status, body)
		}
	}
}
