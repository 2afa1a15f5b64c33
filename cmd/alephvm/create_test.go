package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/message"
)

func TestParseMiB(t *testing.T) {
	for in, want := range map[string]int64{"8GiB": 8192, "10G": 9537, "512": 512, "1.5GiB": 1536, "100MiB": 100} {
		if got, err := parseMiB(in); err != nil || got != want {
			t.Errorf("%s: %d %v, want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "0", "GiB", "ten"} {
		if _, err := parseMiB(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestCreateMessages(t *testing.T) {
	dir := t.TempDir()
	env := []string{"ALEPH_VM_EXECUTION_ROOT=" + filepath.Join(dir, "state"), "ALEPH_VM_CACHE_ROOT=" + filepath.Join(dir, "cache")}
	image := filepath.Join(dir, "base.img")
	os.WriteFile(image, make([]byte, 1<<20), 0o644)
	keys := filepath.Join(dir, "id.pub")
	os.WriteFile(keys, []byte("ssh-ed25519 AAAA me@host\n"), 0o644)
	code, out, errOut := runCLI(t, env, "instance", "create", "--image", image, "--size", "8GiB", "--ssh-key", keys, "--publish", "80")
	if code != 0 {
		t.Fatalf("instance create: %d %s %s", code, out, errOut)
	}
	hash := strings.TrimSpace(out)
	code, out, _ = runCLI(t, env, "message", "get", hash)
	if code != 0 || !strings.Contains(out, `"size_mib":8192`) || !strings.Contains(out, "me@host") || !strings.Contains(out, `"port":80`) {
		t.Errorf("stored message: %d %s", code, out)
	}

	src := filepath.Join(dir, "app")
	os.MkdirAll(filepath.Join(src, "pkg"), 0o755)
	os.WriteFile(filepath.Join(src, "main.py"), []byte("async def app(scope, receive, send): pass\n"), 0o644)
	os.WriteFile(filepath.Join(src, "pkg", "x.py"), []byte("x = 1\n"), 0o644)
	runtime := filepath.Join(dir, "runtime.squashfs")
	os.WriteFile(runtime, []byte("not really a squashfs"), 0o644)
	code, out, errOut = runCLI(t, env, "program", "create", src, "--entrypoint", "main:app", "--runtime", runtime, "--env", "GREETING=hi")
	if code != 0 {
		t.Fatalf("program create: %d %s %s", code, out, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.HasSuffix(lines[1], "/vm/"+lines[0]+"/") {
		t.Errorf("output %q", out)
	}
	code, out, _ = runCLI(t, env, "message", "get", lines[0])
	if code != 0 || !strings.Contains(out, `"entrypoint":"main:app"`) || !strings.Contains(out, `"GREETING":"hi"`) {
		t.Errorf("stored program: %s", out)
	}
	if code, _, errOut := runCLI(t, env, "program", "create", src, "--entrypoint", "main:app"); code == 0 || !strings.Contains(errOut, "--runtime") {
		t.Errorf("no runtime: %d %s", code, errOut)
	}
}

func TestParseVolumes(t *testing.T) {
	vols, err := parseVolumes([]string{"mount=/data,name=data,size=64,parent=def", "mount=/opt/lib,ref=abc"})
	if err != nil || len(vols) != 2 {
		t.Fatalf("%v %v", vols, err)
	}
	if *vols[0].Name != "data" || vols[0].Parent == nil || vols[0].Parent.Ref != "def" || vols[0].SizeMiB != 64 || vols[0].Kind() != message.VolumePersistent || *vols[0].Mount != "/data" {
		t.Errorf("persistent volume: %+v", vols[0])
	}
	if vols[1].Ref != "abc" || !vols[1].UseLatest || vols[1].Kind() != message.VolumeImmutable {
		t.Errorf("immutable volume: %+v", vols[1])
	}
	for _, bad := range []string{"", "mount=/d", "name=x,size=1", "mount=d,name=x,size=1", "mount=/d,name=x,size=0",
		"mount=/d,name=x,size=ten", "mount=/d,ref=abc,size=4", "mount=/d,name=x,size=1,colour=red", "mount=/d,name"} {
		if _, err := parseVolumes([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
