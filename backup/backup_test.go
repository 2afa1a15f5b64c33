package backup

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

const (
	testSecret = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
	testVM     = "cafecafecafecafecafecafecafecafecafecafecafecafecafecafecafecafe"
)

// TestSignGolden checks the signature against one computed with the
// reference's formula: hmac.new(secret.encode(),
// f"{backup_id}:{vm_hash}:{expires}".encode(), hashlib.sha256).hexdigest().
func TestSignGolden(t *testing.T) {
	id := testVM + "-20261203T104258Z"
	const want = "f32088b26657cf7488a57618778bebe0dd5ec154bf69a6f3e70a22655fc4854f"
	if got := Sign(testSecret, id, testVM, 1764845000); got != want {
		t.Fatalf("signature %s, want %s", got, want)
	}
	u := DownloadURL("node.example.org", testSecret, id, testVM, time.Unix(1764845000, 0))
	if want := "https://node.example.org/control/machine/" + testVM + "/backup/" + id + "?signature=" + want + "&expires=1764845000"; u != want {
		t.Fatalf("URL\n%s\nwant\n%s", u, want)
	}
}

func TestVerify(t *testing.T) {
	id := testVM + "-20261203T104258Z"
	now := time.Unix(1764845000, 0)
	good := Sign(testSecret, id, testVM, now.Unix()+60)
	for _, c := range []struct {
		name, sig, exp string
		status         int
		msg            string
	}{
		{"valid", good, "1764845060", 0, ""},
		{"no signature", "", "1764845060", 403, "Missing signature or expires parameter"},
		{"no expiry", good, "", 403, "Missing signature or expires parameter"},
		{"bad expiry", good, "soon", 400, "Invalid expires parameter"},
		{"expired", Sign(testSecret, id, testVM, now.Unix()-1), "1764844999", 403, "Download link has expired"},
		{"other expiry", good, "1764845061", 403, "Invalid signature"},
		{"upper-case hex", strings.ToUpper(good), "1764845060", 403, "Invalid signature"},
	} {
		err := Verify(testSecret, id, testVM, c.sig, c.exp, now)
		if c.status == 0 {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		var e *Error
		if !errors.As(err, &e) || e.Status != c.status || e.Msg != c.msg {
			t.Errorf("%s: %v, want %d %q", c.name, err, c.status, c.msg)
		}
	}
	if err := Verify("another secret", id, testVM, good, "1764845060", now); err == nil {
		t.Error("a URL signed with another key is accepted")
	}
}

func TestValidateID(t *testing.T) {
	for _, c := range []struct {
		id     string
		status int
	}{
		{testVM + "-20261203T104258Z", 0},
		{"", 400},
		{testVM + "-../x", 400},
		{testVM + "-a/b", 400},
		{testVM + `-a\b`, 400},
		{testVM + "-a\x00", 400},
		{testVM + "-a\n", 400},
		{"..", 400},
		{"beef" + testVM[4:] + "-20261203T104258Z", 403},
		{testVM, 403}, // the hash alone names no backup
		{testVM + "x-20261203T104258Z", 403},
	} {
		err := ValidateID(c.id, testVM)
		var e *Error
		switch {
		case c.status == 0 && err != nil:
			t.Errorf("%q: %v", c.id, err)
		case c.status != 0 && (!errors.As(err, &e) || e.Status != c.status):
			t.Errorf("%q: %v, want %d", c.id, err, c.status)
		}
	}
}

// TestMetaShape checks the answer's keys, their order and their values
// against the reference's backup_metadata plus download_url.
func TestMetaShape(t *testing.T) {
	dir := t.TempDir()
	id := testVM + "-20261203T104258Z"
	root := filepath.Join(dir, "root")
	os.WriteFile(root, []byte("disk"), 0o600)
	sum, err := writeTar(filepath.Join(dir, id+tarSuffix), []struct{ name, path string }{{"rootfs.qcow2", root}, {"volume-data.qcow2", root}})
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, id+sumSuffix), []byte(sum+"  "+id+".tar\n"), 0o600)
	stored, _ := json.Marshal(storedMeta{VMHash: testVM, CreatedAt: "20261203T104258Z", Consistency: Frozen,
		SourceSizes: sizes{{"rootfs.qcow2", 196624}, {"volume-data.qcow2", 1048576}}})
	if want := `{"vm_hash":"` + testVM + `","created_at":"20261203T104258Z","source_sizes":{"rootfs.qcow2":196624,"volume-data.qcow2":1048576},"consistency":"frozen"}`; string(stored) != want {
		t.Fatalf("stored meta %s", stored)
	}
	os.WriteFile(filepath.Join(dir, id+metaSuffix), stored, 0o600)
	mtime := time.Unix(1764845000, 250_000_000)
	os.Chtimes(filepath.Join(dir, id+tarSuffix), mtime, mtime)

	m := &Manager{opts: Options{Dir: dir, MaxAge: DefaultMaxAge, Secret: testSecret, Domain: "node.example.org",
		Now: func() time.Time { return time.Unix(1764845000-24*3600, 0) }}}
	meta, err := m.meta(testVM, id)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // as Python's json.dumps
	enc.Encode(meta)
	got := strings.TrimSpace(buf.String())
	st, _ := os.Stat(filepath.Join(dir, id+tarSuffix))
	want := `{"backup_id":"` + id + `","size":` + itoa(st.Size()) + `,"volumes":["rootfs.qcow2","volume-data.qcow2"],` +
		`"expires_at":"2025-12-05T10:43:20.250000+00:00","checksum":"sha256:` + sum + `",` +
		`"source_sizes":{"rootfs.qcow2":196624,"volume-data.qcow2":1048576},"consistency":"frozen",` +
		`"download_url":"` + DownloadURL("node.example.org", testSecret, id, testVM, time.Unix(1764845000, 0)) + `"}`
	if got != want {
		t.Fatalf("meta\n%s\nwant\n%s", got, want)
	}
	if sourceSize(dir, id) != 196624+1048576 {
		t.Errorf("source size %d", sourceSize(dir, id))
	}
}

func itoa(n int64) string { b, _ := json.Marshal(n); return string(b) }

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

// TestValidateRefusals: a restored disk is refused, with its reason,
// when it names a backing file or a data file (read from its header
// before any tool opens it), is not a sound qcow2, or is larger than
// the instance's disk.
func TestValidateRefusals(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	ctx := context.Background()
	path := func(name string) string { return filepath.Join(dir, name) }
	qemuImg(t, "create", "-q", "-f", "qcow2", path("good.qcow2"), "64M")
	qemuImg(t, "create", "-q", "-f", "raw", path("base.raw"), "64M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", path("base.raw"), path("backed.qcow2"), "64M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+path("data.raw"), path("datafile.qcow2"), "64M")
	qemuImg(t, "create", "-q", "-f", "qcow2", path("big.qcow2"), "2G")
	// Its magic and version, then nothing sound.
	os.WriteFile(path("broken.qcow2"), append([]byte("QFI\xfb\x00\x00\x00\x03"), bytes.Repeat([]byte{0xab}, 4096)...), 0o600)
	good, _ := os.ReadFile(path("good.qcow2"))
	truncated := good[:len(good)/2]
	os.WriteFile(path("truncated.qcow2"), truncated, 0o600)
	os.WriteFile(path("tar.tar"), bytes.Repeat([]byte("not a disk"), 100), 0o600)

	for _, c := range []struct {
		file, reason string
	}{
		{"good.qcow2", ""},
		{"backed.qcow2", "backing file"},
		{"datafile.qcow2", "data file"},
		{"big.qcow2", "exceeds declared rootfs size"},
		{"broken.qcow2", "not a valid QCOW2"},
		{"truncated.qcow2", "not a valid QCOW2"},
		{"base.raw", "not a valid QCOW2"},
		{"tar.tar", "not a valid QCOW2"},
	} {
		err := Validate(ctx, path(c.file), 1<<30)
		if c.reason == "" {
			if err != nil {
				t.Errorf("%s: %v", c.file, err)
			}
			continue
		}
		var e *Error
		if !errors.As(err, &e) || e.Status != 400 || !strings.Contains(e.Msg, c.reason) {
			t.Errorf("%s: %v, want a 400 about %q", c.file, err, c.reason)
		}
	}
}

// fakeInstances serves one VM's disks and records the restores.
type fakeInstances struct {
	vm       VM
	sizeMiB  int64
	mu       sync.Mutex
	replaced []string
}

func (f *fakeInstances) BackupVM(ctx context.Context, ref message.ItemHash, volumes bool) (VM, error) {
	if ref != testVM {
		return VM{}, NotHosted(ref)
	}
	return f.vm, nil
}

func (f *fakeInstances) RootDiskSizeMiB(ctx context.Context, ref message.ItemHash) (int64, error) {
	return f.sizeMiB, nil
}

func (f *fakeInstances) ReplaceRootDisk(ctx context.Context, ref message.ItemHash, path string, move bool) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.replaced = append(f.replaced, string(b[:4]))
	return nil
}

type fakePauser struct {
	mu             sync.Mutex
	paused, resume int
}

func (p *fakePauser) Pause(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.paused++
	return nil
}

func (p *fakePauser) Resume(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resume++
	return nil
}

// fakeAgent answers as qemu-guest-agent on a unix socket and counts the
// freezes and thaws.
type fakeAgent struct {
	mu             sync.Mutex
	frozen, thawed int
}

func (a *fakeAgent) serve(t *testing.T, socket string) {
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadBytes('\n')
					if err != nil {
						return
					}
					line = bytes.TrimLeft(line, "\xff")
					var req struct {
						Execute   string          `json:"execute"`
						Arguments json.RawMessage `json:"arguments"`
					}
					json.Unmarshal(line, &req)
					a.mu.Lock()
					switch req.Execute {
					case "guest-sync-delimited":
						var args struct {
							ID int64 `json:"id"`
						}
						json.Unmarshal(req.Arguments, &args)
						c.Write([]byte("\xff{\"return\": " + itoa(args.ID) + "}\n"))
					case "guest-fsfreeze-freeze":
						a.frozen++
						c.Write([]byte("{\"return\": 2}\n"))
					case "guest-fsfreeze-thaw":
						a.thawed++
						c.Write([]byte("{\"return\": 2}\n"))
					}
					a.mu.Unlock()
				}
			}()
		}
	}()
}

// newTestVM makes a root disk as an instance has one: a qcow2 layer
// over a raw base, with data in both.
func newTestVM(t *testing.T, dir string) VM {
	base := filepath.Join(dir, "base")
	qemuImg(t, "create", "-q", "-f", "raw", base, "32M")
	f, _ := os.OpenFile(base, os.O_WRONLY, 0)
	f.WriteAt([]byte("BASE"), 0)
	f.Close()
	root := filepath.Join(dir, "rootfs.qcow2")
	// The header names a path that does not exist: the copy must read
	// the chain it is given.
	qemuImg(t, "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", "/nonexistent/base", root, "32M")
	if out, err := exec.Command("qemu-io", "--image-opts", "-c", "write -P 0x5a 1M 64k",
		"driver=qcow2,file.driver=file,file.filename="+root+",backing.driver=raw,backing.file.driver=file,backing.file.filename="+base).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	return VM{Disks: []Disk{{Member: "rootfs.qcow2", Image: storage.Image{Path: root, Format: storage.FormatQCOW2},
		Backing: []hypervisor.Layer{{Path: base, Format: storage.FormatRaw}}}}}
}

func waitDone(t *testing.T, m *Manager) Answer {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if a := m.Status(testVM); a.Status != 202 {
			return a
		}
	}
	t.Fatal("the backup never ended")
	return Answer{}
}

// TestBackupAndRestore runs a backup with and without a guest agent, its
// download and deletion, and a restore from its rootfs.qcow2, against a
// fake instance.
func TestBackupAndRestore(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	vm := newTestVM(t, dir)
	// A volume too, with a name longer than a tar header holds.
	volume := filepath.Join(dir, "volume-"+strings.Repeat("v", 120)+".ext4")
	os.WriteFile(volume, bytes.Repeat([]byte("volume"), 100_000), 0o600)
	vm.Disks = append(vm.Disks, Disk{Member: strings.TrimSuffix(filepath.Base(volume), ".ext4") + ".qcow2",
		Image: storage.Image{Path: volume, Format: storage.FormatRaw}})
	pauser := &fakePauser{}
	vm.Pauser = pauser
	agent := &fakeAgent{}
	vm.GuestAgent = filepath.Join(dir, "qga.sock")
	agent.serve(t, vm.GuestAgent)
	inst := &fakeInstances{vm: vm, sizeMiB: 32}
	m, err := New(Options{Dir: filepath.Join(dir, "backups"), Secret: testSecret, Domain: "node.example.org", Instances: inst})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := m.Create(ctx, message.ItemHash("beef"+testVM[4:]), Request{}); err == nil {
		t.Fatal("a backup of a VM the node does not host")
	}
	if a := m.Status(testVM); a.Status != 404 || a.Text != "No backup found for this VM" {
		t.Fatalf("before any backup: %+v", a)
	}
	if a, err := m.Create(ctx, testVM, Request{}); err != nil || a.Status != 202 {
		t.Fatalf("create: %+v %v", a, err)
	}
	a := waitDone(t, m)
	if a.Status != 200 || a.Meta == nil || a.Meta.Consistency != Frozen || len(a.Meta.Volumes) != 2 ||
		a.Meta.Volumes[0] != "rootfs.qcow2" || a.Meta.Volumes[1] != vm.Disks[1].Member || a.Meta.SourceSizes[1].Size != 600_000 {
		t.Fatalf("backup: %+v", a)
	}
	if agent.frozen != 1 || agent.thawed != 1 || pauser.paused != 0 {
		t.Errorf("froze %d, thawed %d, paused %d times", agent.frozen, agent.thawed, pauser.paused)
	}
	// With one backup kept, a fresh one is answered again.
	again, err := m.Create(ctx, testVM, Request{})
	if err != nil || again.Status != 200 || again.Meta.BackupID != a.Meta.BackupID {
		t.Fatalf("second create: %+v %v", again, err)
	}

	// The download through the presigned URL.
	u, _ := url.Parse(a.Meta.DownloadURL)
	id := a.Meta.BackupID
	if _, err := m.Open(testVM, id, u.Query().Get("signature")+"0", u.Query().Get("expires")); err == nil {
		t.Fatal("a bad signature opens the backup")
	}
	dl, err := m.Open(testVM, id, u.Query().Get("signature"), u.Query().Get("expires"))
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(dl)
	dl.Close()
	sum := sha256.Sum256(data)
	if "sha256:"+hex.EncodeToString(sum[:]) != a.Meta.Checksum || dl.Checksum != hex.EncodeToString(sum[:]) {
		t.Fatalf("checksum %x, meta says %s", sum, a.Meta.Checksum)
	}
	tr := tar.NewReader(bytes.NewReader(data))
	h, err := tr.Next()
	if err != nil || h.Name != "rootfs.qcow2" {
		t.Fatalf("tar: %v %v", h, err)
	}
	copyPath := filepath.Join(dir, "restored.qcow2")
	f, _ := os.Create(copyPath)
	io.Copy(f, tr)
	f.Close()
	if h, err := tr.Next(); err != nil || h.Name != vm.Disks[1].Member {
		t.Fatalf("the volume's member: %v %v", h, err)
	}
	volCopy := filepath.Join(dir, "volume.qcow2")
	f, _ = os.Create(volCopy)
	io.Copy(f, tr)
	f.Close()
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "qcow2", volume, volCopy).CombinedOutput(); err != nil {
		t.Fatalf("the volume's copy: %v\n%s", err, out)
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Fatalf("after the members: %v", err)
	}
	// The copy stands alone and holds the base's and the layer's data.
	if err := Validate(ctx, copyPath, 32<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", "-c", "read -v 0 4", copyPath).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "BASE") || strings.Contains(string(out), "Pattern verification failed") {
		t.Fatalf("the copy's data: %v\n%s", err, out)
	}

	// A restore from an upload of that copy.
	upload, _ := os.Open(copyPath)
	err = m.Restore(ctx, testVM, Restore{Upload: upload, ContentLength: -1})
	upload.Close()
	if err != nil || len(inst.replaced) != 1 || inst.replaced[0] != "QFI\xfb" {
		t.Fatalf("restore: %v %q", err, inst.replaced)
	}
	if _, err := os.Stat(filepath.Join(m.opts.Dir, "restore-"+testVM+".qcow2")); !os.IsNotExist(err) {
		t.Error("the upload is left after a restore")
	}
	big := bytes.NewReader(make([]byte, 33<<20))
	var e *Error
	if err := m.Restore(ctx, testVM, Restore{Upload: big, ContentLength: -1}); !errors.As(err, &e) || e.Status != 413 {
		t.Errorf("an upload larger than the disk: %v", err)
	}
	if err := m.Restore(ctx, testVM, Restore{Upload: big, ContentLength: 33 << 20}); !errors.As(err, &e) || e.Status != 413 {
		t.Errorf("a Content-Length larger than the disk: %v", err)
	}

	if err := m.Delete(testVM, id); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(m.opts.Dir, "*")); len(left) != 0 {
		t.Errorf("left after delete: %v", left)
	}

	// Without the guest agent's help: the VM is paused for the copy.
	vm.GuestAgent = filepath.Join(dir, "none.sock")
	inst.vm = vm
	if a, err := m.Create(ctx, testVM, Request{}); err != nil || a.Status != 202 {
		t.Fatalf("create: %+v %v", a, err)
	}
	if a := waitDone(t, m); a.Status != 200 || a.Meta.Consistency != Crash || pauser.paused != 1 || pauser.resume != 1 {
		t.Fatalf("crash-consistent backup: %+v, paused %d, resumed %d", a, pauser.paused, pauser.resume)
	}
}

// TestKeepAndExpiry: with several backups kept, each call makes one and
// the oldest beyond the count goes; an expired backup is removed.
func TestKeepAndExpiry(t *testing.T) {
	testenv.RequireTools(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	vm := newTestVM(t, dir)
	vm.Pauser = &fakePauser{}
	now := time.Now()
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	m, err := New(Options{Dir: filepath.Join(dir, "backups"), Keep: 2, Secret: testSecret, Instances: &fakeInstances{vm: vm}, Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range 3 {
		if a, err := m.Create(context.Background(), testVM, Request{}); err != nil || a.Status != 202 {
			t.Fatalf("create: %+v %v", a, err)
		}
		a := waitDone(t, m)
		if a.Status != 200 {
			t.Fatalf("backup: %+v", a)
		}
		ids = append(ids, a.Meta.BackupID)
	}
	if ids[0] == ids[1] || ids[1] == ids[2] {
		t.Fatalf("ids repeat: %v", ids)
	}
	kept, _ := list(m.opts.Dir, testVM)
	if len(kept) != 2 || kept[0] != ids[2] || kept[1] != ids[1] {
		t.Fatalf("kept %v of %v", kept, ids)
	}
	mu.Lock()
	now = now.Add(25 * time.Hour)
	mu.Unlock()
	if a := m.Status(testVM); a.Status != 404 {
		t.Fatalf("after expiry: %+v", a)
	}
	if left, _ := filepath.Glob(filepath.Join(m.opts.Dir, "*")); len(left) != 0 {
		t.Errorf("left after expiry: %v", left)
	}
}

func TestImageOpts(t *testing.T) {
	d := Disk{Image: storage.Image{Path: "/v/a,b/rootfs.qcow2", Format: "qcow2"},
		Backing: []hypervisor.Layer{{Path: "/v/l2.qcow2", Format: "qcow2"}, {Path: "/v/base", Format: "raw"}}}
	want := "driver=qcow2,file.driver=file,file.filename=/v/a,,b/rootfs.qcow2," +
		"backing.driver=qcow2,backing.file.driver=file,backing.file.filename=/v/l2.qcow2," +
		"backing.backing.driver=raw,backing.backing.file.driver=file,backing.backing.file.filename=/v/base"
	if got := imageOpts(d); got != want {
		t.Errorf("image opts\n%s\nwant\n%s", got, want)
	}
	standalone := Disk{Image: storage.Image{Path: "/v/r.qcow2", Format: "qcow2"}}
	if got := imageOpts(standalone); got != "driver=qcow2,file.driver=file,file.filename=/v/r.qcow2,backing=" {
		t.Errorf("standalone: %s", got)
	}
}

// writeTar writes a tar of members, as a backup's, and returns its
// sha256.
func writeTar(path string, members []struct{ name, path string }) (string, error) {
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(f, h))
	for _, m := range members {
		b, err := os.ReadFile(m.path)
		if err != nil {
			return "", err
		}
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: m.name, Mode: 0o644, Size: int64(len(b))})
		tw.Write(b)
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
