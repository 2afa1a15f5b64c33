package assets

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/internal/testenv"
)

// cpioEntry is what TestCPIO reads back.
type cpioEntry struct {
	name        string
	mode        uint32
	data        string
	major, minr uint32
}

func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	align := func(n int) int { return (n + 3) &^ 3 }
	for pos := 0; ; {
		h := string(b[pos : pos+110])
		if h[:6] != "070701" {
			t.Fatalf("bad magic at %d: %q", pos, h[:6])
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return uint32(v)
		}
		size, namesize := int(field(6)), int(field(11))
		name := string(b[pos+110 : pos+110+namesize-1])
		pos = align(pos + 110 + namesize)
		if name == "TRAILER!!!" {
			return out
		}
		out = append(out, cpioEntry{name, field(1), string(b[pos : pos+size]), field(9), field(10)})
		pos = align(pos + size)
	}
}

func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	c := newCPIOWriter(&buf)
	c.Dir("dev", 0o755)
	c.CharDevice("dev/console", 0o600, 5, 1)
	c.File("init", 0o755, []byte("#!/bin/true\n"))
	c.Symlink("sbin", "init")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive of %d bytes is not 4-aligned", buf.Len())
	}
	got := readCPIO(t, buf.Bytes())
	want := []cpioEntry{
		{"dev", cpioDir | 0o755, "", 0, 0},
		{"dev/console", cpioChar | 0o600, "", 5, 1},
		{"init", cpioFile | 0o755, "#!/bin/true\n", 0, 0},
		{"sbin", cpioSymlink | 0o777, "init", 0, 0},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read back\n%v\nwant\n%v", got, want)
	}
}

func TestSourcesFor(t *testing.T) {
	targets := `http://deb.example/debian/ bookworm main
http://deb.example/debian/ bookworm contrib
http://deb.example/debian/ bookworm-updates main
http://sec.example/debian-security/ bookworm-security main
http://deb.example/debian/ trixie main
https://other.example/apt cloud-sdk-bookworm main
`
	got, err := sourcesFor(targets, "bookworm")
	want := "deb http://deb.example/debian/ bookworm contrib main\n" +
		"deb http://sec.example/debian-security/ bookworm-security main\n" +
		"deb http://deb.example/debian/ bookworm-updates main\n"
	if err != nil || got != want {
		t.Errorf("got\n%s%v\nwant\n%s", got, err, want)
	}
	if _, err := sourcesFor(targets, "sid"); err == nil {
		t.Error("found sources for a suite the machine does not have")
	}
}

func TestManifest(t *testing.T) {
	dir := t.TempDir()
	m, err := Load(dir)
	if err != nil || len(m.Assets) != 0 {
		t.Fatalf("empty directory: %v %v", m, err)
	}
	os.WriteFile(filepath.Join(dir, "a.img"), []byte("first"), 0o644)
	if _, err := m.record(Runtime, "a.img", "k1", "v"); err != nil {
		t.Fatal(err)
	}
	m.Assets[Runtime].Ref = "ref1"
	if _, ok := m.fresh(Runtime, "k1"); !ok {
		t.Error("just recorded, not fresh")
	}
	if _, ok := m.fresh(Runtime, "k2"); ok {
		t.Error("fresh for other inputs")
	}
	// The same content keeps its ref; another loses it.
	if a, _ := m.record(Runtime, "a.img", "k1", "v"); a.Ref != "ref1" {
		t.Error("ref lost for the same content")
	}
	os.WriteFile(filepath.Join(dir, "a.img"), []byte("second"), 0o644)
	if a, _ := m.record(Runtime, "a.img", "k1", "v"); a.Ref != "" {
		t.Error("ref kept for other content")
	}
	loaded, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte("second"))
	if a := loaded.Assets[Runtime]; a.SHA256 != hex.EncodeToString(sum[:]) || a.Size != 6 {
		t.Errorf("loaded %+v", a)
	}
	if p, err := loaded.Path(Runtime); err != nil || p != filepath.Join(dir, "a.img") {
		t.Errorf("path %s %v", p, err)
	}
	if _, err := loaded.Path(KernelVmlinux); err == nil || !strings.Contains(err.Error(), "assets build") {
		t.Errorf("missing asset: %v", err)
	}
	os.Truncate(filepath.Join(dir, "a.img"), 1)
	if _, ok := loaded.fresh(Runtime, "k1"); ok {
		t.Error("a file of another size is fresh")
	}
}

type fakeRegistry struct{ added []string }

func (r *fakeRegistry) AddFile(_ context.Context, path string) (string, error) {
	r.added = append(r.added, path)
	return fmt.Sprintf("ref%d", len(r.added)), nil
}

func TestRegister(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "r.sqsh"), []byte("x"), 0o644)
	m, _ := Load(dir)
	a, _ := m.record(Runtime, "r.sqsh", "k", "")
	reg := &fakeRegistry{}
	for range 2 {
		if err := m.register(context.Background(), reg, a); err != nil {
			t.Fatal(err)
		}
	}
	if len(reg.added) != 1 || a.Ref != "ref1" {
		t.Errorf("registered %v, ref %q", reg.added, a.Ref)
	}
	if err := m.register(context.Background(), nil, a); err != nil {
		t.Error(err)
	}
}

func TestFetch(t *testing.T) {
	files := map[string][]byte{"/fc": []byte("firecracker binary"), "/vmlinux": bytes.Repeat([]byte("k"), 100000)}
	var requests atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}))
	defer srv.Close()
	sum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	good := FetchManifest{Files: []FetchFile{
		{Name: "firecracker", URL: srv.URL + "/fc", SHA256: sum(files["/fc"]), Executable: true},
		{Name: "vmlinux", URL: srv.URL + "/vmlinux", SHA256: sum(files["/vmlinux"]), Size: 100000},
	}}
	dir := t.TempDir()
	m, err := Fetch(context.Background(), dir, good, srv.Client(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	p, err := m.Path("fetched/firecracker")
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o755 {
		t.Errorf("mode %v", st.Mode())
	}
	if _, err := Fetch(context.Background(), dir, good, srv.Client(), io.Discard); err != nil || requests.Load() != 2 {
		t.Errorf("second fetch: %v, %d requests in all", err, requests.Load())
	}

	bad := map[string]FetchFile{
		"checksum":  {Name: "x", URL: srv.URL + "/fc", SHA256: sum([]byte("other"))},
		"size":      {Name: "x", URL: srv.URL + "/vmlinux", SHA256: sum(files["/vmlinux"]), Size: 99999},
		"not found": {Name: "x", URL: srv.URL + "/missing", SHA256: sum(nil)},
	}
	for name, f := range bad {
		_, err := Fetch(context.Background(), dir, FetchManifest{Files: []FetchFile{f}}, srv.Client(), io.Discard)
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
		left, _ := filepath.Glob(filepath.Join(dir, "fetched", "x*"))
		if len(left) != 0 {
			t.Errorf("%s: left %v behind", name, left)
		}
	}
}

func TestReadFetchManifest(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "m.json")
		os.WriteFile(p, []byte(s), 0o644)
		return p
	}
	ok := `{"files": [{"name": "fc", "url": "https://example.org/fc", "sha256": "` + strings.Repeat("ab", 32) + `"}]}`
	if fm, err := ReadFetchManifest(write(ok)); err != nil || len(fm.Files) != 1 {
		t.Errorf("valid manifest: %v", err)
	}
	for name, s := range map[string]string{
		"unknown field": `{"files": [], "extra": 1}`,
		"path name":     `{"files": [{"name": "../fc", "url": "https://e.org/x", "sha256": "` + strings.Repeat("ab", 32) + `"}]}`,
		"short sha":     `{"files": [{"name": "fc", "url": "https://e.org/x", "sha256": "abcd"}]}`,
		"upper sha":     `{"files": [{"name": "fc", "url": "https://e.org/x", "sha256": "` + strings.Repeat("AB", 32) + `"}]}`,
		"file url":      `{"files": [{"name": "fc", "url": "file:///etc/passwd", "sha256": "` + strings.Repeat("ab", 32) + `"}]}`,
	} {
		if _, err := ReadFetchManifest(write(s)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestModuleIndexRoundTrip(t *testing.T) {
	mods := []guest.Module{{Name: "ext4"}, {Name: "virtio_blk", File: "lib/modules/virtio_blk.ko", Deps: []string{"virtio", "virtio_ring"}}}
	var buf bytes.Buffer
	if err := guest.FormatModuleIndex(&buf, mods); err != nil {
		t.Fatal(err)
	}
	got, err := guest.ParseModuleIndex(&buf)
	if err != nil || got["ext4"].File != "" || len(got["virtio_blk"].Deps) != 2 || got["virtio_blk"].File != mods[1].File {
		t.Errorf("round trip %v %v", got, err)
	}
}

func TestStripModuleSignature(t *testing.T) {
	module := []byte("\x7fELF module body")
	signer, keyID, sig := []byte("Debian"), []byte("key-id"), bytes.Repeat([]byte{0x5a}, 512)
	info := make([]byte, 12)
	info[3], info[4] = byte(len(signer)), byte(len(keyID))
	binary.BigEndian.PutUint32(info[8:], uint32(len(sig)))
	signed := slices.Concat(module, signer, keyID, sig, info, moduleSigMagic)
	if got, err := stripModuleSignature(signed); err != nil || !bytes.Equal(got, module) {
		t.Errorf("stripped to %q, %v", got, err)
	}
	if got, err := stripModuleSignature(module); err != nil || !bytes.Equal(got, module) {
		t.Errorf("unsigned module changed: %q, %v", got, err)
	}
	binary.BigEndian.PutUint32(info[8:], 1<<20)
	if _, err := stripModuleSignature(slices.Concat(module, info, moduleSigMagic)); err == nil {
		t.Error("a signature longer than the module was accepted")
	}
}

func TestCollect(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"initramfs/new.cpio", "initramfs/old.cpio", "initramfs/recent.cpio", "kernel/k_1/boot/vmlinuz", "kernel/k_0/boot/vmlinuz", "runtime/.build/root/x"} {
		os.MkdirAll(filepath.Join(dir, filepath.Dir(f)), 0o755)
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644)
	}
	long := time.Now().Add(-2 * time.Hour)
	for _, f := range []string{"initramfs/new.cpio", "initramfs/old.cpio", "kernel/k_1", "kernel/k_0", "runtime/.build"} {
		os.Chtimes(filepath.Join(dir, f), long, long)
	}
	m, _ := Load(dir)
	m.record(Initramfs, "initramfs/new.cpio", "k", "")
	m.record(KernelBzImage, "kernel/k_1/boot/vmlinuz", "k", "")
	if err := m.collect(time.Now().Add(-keepReplaced)); err != nil {
		t.Fatal(err)
	}
	for f, kept := range map[string]bool{
		"initramfs/new.cpio": true, "initramfs/recent.cpio": true, "kernel/k_1": true,
		"initramfs/old.cpio": false, "kernel/k_0": false, "runtime/.build": false,
	} {
		if _, err := os.Stat(filepath.Join(dir, f)); (err == nil) != kept {
			t.Errorf("%s: kept %v, want %v", f, err == nil, kept)
		}
	}
}

func TestCheckStatic(t *testing.T) {
	if err := checkStatic("/bin/sh"); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("a dynamic binary: %v", err)
	}
	text := filepath.Join(t.TempDir(), "init")
	os.WriteFile(text, []byte("#!/bin/sh\n"), 0o755)
	if err := checkStatic(text); err == nil {
		t.Error("a script taken for a static binary")
	}
	if _, err := Build(context.Background(), Options{Dir: t.TempDir(), Init: text}); err == nil {
		t.Error("Build took a script for the init")
	}
}

// TestCachedDeb finds a package's .deb in the package cache only at the
// version asked for.
func TestCachedDeb(t *testing.T) {
	testenv.RequireTools(t, "dpkg-deb")
	cache := t.TempDir()
	for _, version := range []string{"1.0-1", "1.0-2"} {
		tree := filepath.Join(t.TempDir(), "pkg")
		if err := os.MkdirAll(filepath.Join(tree, "DEBIAN"), 0o755); err != nil {
			t.Fatal(err)
		}
		control := "Package: linux-image-test\nVersion: " + version + "\nArchitecture: amd64\nMaintainer: t <t@example.org>\nDescription: test\n"
		if err := os.WriteFile(filepath.Join(tree, "DEBIAN", "control"), []byte(control), 0o644); err != nil {
			t.Fatal(err)
		}
		deb := filepath.Join(cache, "linux-image-test_"+version+"_amd64.deb")
		if out, err := exec.Command("dpkg-deb", "--root-owner-group", "--build", tree, deb).CombinedOutput(); err != nil {
			t.Fatalf("dpkg-deb --build: %v\n%s", err, out)
		}
	}
	ctx := context.Background()
	if got := cachedDeb(ctx, cache, "linux-image-test", "1.0-2"); filepath.Base(got) != "linux-image-test_1.0-2_amd64.deb" {
		t.Errorf("1.0-2: got %q", got)
	}
	if got := cachedDeb(ctx, cache, "linux-image-test", "1.0-3"); got != "" {
		t.Errorf("1.0-3 is not in the cache, got %q", got)
	}
	if got := cachedDeb(ctx, "", "linux-image-test", "1.0-1"); got != "" {
		t.Errorf("no cache, got %q", got)
	}
}
