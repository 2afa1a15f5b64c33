package assets

import (
	"bytes"
	"context"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/internal/testenv"
)

// TestBuild builds every asset into the shared test cache (or finds them
// up to date: the first run takes several minutes) and checks what came
// out, then that a second build changes nothing.
func TestBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds Debian roots: not in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (mmdebstrap)")
	}
	testenv.RequireTools(t, "apt-get", "apt-cache", "dpkg-deb", "mmdebstrap", "mksquashfs", "unsquashfs", "mkfs.ext4", "e2fsck", "go")
	dir := filepath.Join(testenv.CacheDir(t), "assets")
	initBin := buildInit(t)
	reg := &fakeRegistry{}
	opts := Options{Dir: dir, Init: initBin, Runtime: true, Registry: reg, PackageCache: testenv.PackageCache(), Progress: testWriter{t}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	m, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []Name{KernelBzImage, KernelVmlinux, Initramfs, Runtime} {
		a := m.Assets[name]
		if a == nil || len(a.SHA256) != sha256HexLen || a.Size == 0 {
			t.Fatalf("%s: %+v", name, a)
		}
	}
	if m.Assets[Runtime].Ref == "" {
		t.Errorf("%s was not registered", Runtime)
	}

	t.Run("vmlinux", func(t *testing.T) {
		f, err := elf.Open(mustPath(t, m, KernelVmlinux))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if f.Machine != elf.EM_X86_64 {
			t.Errorf("machine %v", f.Machine)
		}
	})
	t.Run("initramfs", func(t *testing.T) {
		b, err := os.ReadFile(mustPath(t, m, Initramfs))
		if err != nil {
			t.Fatal(err)
		}
		files := map[string]cpioEntry{}
		for _, e := range readCPIO(t, b) {
			files[e.name] = e
		}
		if files["init"].mode != cpioFile|0o755 || files["dev/console"].major != 5 {
			t.Error("no executable /init or no /dev/console")
		}
		index, err := guest.ParseModuleIndex(strings.NewReader(files[strings.TrimPrefix(guest.ModuleIndexPath, "/")].data))
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range guest.InitModules {
			mod, ok := index[name]
			if !ok {
				t.Errorf("module %s is not in the index", name)
				continue
			}
			data := []byte(files[mod.File].data)
			if mod.File != "" && (!bytes.HasPrefix(data, []byte("\x7fELF")) || bytes.HasSuffix(data, moduleSigMagic)) {
				t.Errorf("module %s: no file %s, or still signed", name, mod.File)
			}
		}
	})
	t.Run("runtime", func(t *testing.T) {
		img := mustPath(t, m, Runtime)
		list := runOut(t, "unsquashfs", "-l", img)
		for _, want := range []string{"/usr/bin/python3", "/usr/lib/python3/dist-packages/uvicorn/", "/etc/ssl/certs/ca-certificates.crt", "/opt/code"} {
			if !strings.Contains(list, want) {
				t.Errorf("runtime lacks %s", want)
			}
		}
		if passwd := runOut(t, "unsquashfs", "-cat", img, "etc/passwd"); !strings.Contains(passwd, RuntimeUser+":x:1000:1000:") {
			t.Errorf("no %s user in the runtime:\n%s", RuntimeUser, passwd)
		}
	})

	again, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	for name, a := range m.Assets {
		if b := again.Assets[name]; b == nil || *b != *a {
			t.Errorf("%s changed on a second build: %+v, then %+v", name, a, b)
		}
	}
	if len(reg.added) > 1 {
		t.Errorf("registered again: %v", reg.added)
	}
}

// buildInit builds alephvm-init as the Debian package does, static.
func buildInit(t *testing.T) string {
	t.Helper()
	initBin := filepath.Join(t.TempDir(), "alephvm-init")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", initBin, "../cmd/alephvm-init")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build alephvm-init: %v\n%s", err, out)
	}
	return initBin
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

func mustPath(t *testing.T, m Manifest, name Name) string {
	t.Helper()
	p, err := m.Path(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func runOut(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
