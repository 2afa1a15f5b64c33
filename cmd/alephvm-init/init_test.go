package main

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// hostilePasswd is a runtime's /etc/passwd that makes the default user
// root: the init must not believe it.
const hostilePasswd = `root:x:0:0:root:/root:/bin/bash
aleph:x:0:0::/root:/bin/sh
nobody:x:0:0:nobody:/nonexistent:/usr/sbin/nologin
`

func rootWithPasswd(t *testing.T, content string) string {
	t.Helper()
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	if err := os.WriteFile(filepath.Join(root, "etc/passwd"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestWorkloadUserIgnoresTheRuntime(t *testing.T) {
	newRoot := rootWithPasswd(t, hostilePasswd)
	u, err := setupWorkloadUser(newRoot, "")
	want := user{guest.DefaultUser, guest.WorkloadUID, guest.WorkloadGID, "/home/aleph"}
	if err != nil || u != want {
		t.Fatalf("got %+v, %v; want %+v", u, err, want)
	}
	st, err := os.Stat(filepath.Join(newRoot, "home/aleph"))
	if err != nil || !st.IsDir() {
		t.Fatalf("home: %v", err)
	}
	if os.Geteuid() == 0 {
		if sys := st.Sys().(*syscall.Stat_t); sys.Uid != guest.WorkloadUID || sys.Gid != guest.WorkloadGID {
			t.Errorf("home owned by %d:%d", sys.Uid, sys.Gid)
		}
	}
	for _, spec := range []string{"0", "root", "aleph", "0:0", "1000:0", "nobody"} {
		if u, err := setupWorkloadUser(newRoot, spec); err == nil {
			t.Errorf("workload user %q: %+v", spec, u)
		}
	}
	if u, err := workloadUser("2000:33"); err != nil || u != (user{"2000", 2000, 33, "/home/2000"}) {
		t.Errorf("2000:33: %+v %v", u, err)
	}
}

// A runtime whose /home is a symlink out of the root cannot make the init
// create or chown anything outside it.
func TestWorkloadHomeStaysInTheRoot(t *testing.T) {
	outside := t.TempDir()
	newRoot := rootWithPasswd(t, hostilePasswd)
	if err := os.Symlink(outside, filepath.Join(newRoot, "home")); err != nil {
		t.Fatal(err)
	}
	u, err := setupWorkloadUser(newRoot, "")
	if err != nil || u.uid != guest.WorkloadUID || u.home != "/" {
		t.Errorf("got %+v, %v; want the workload's uid with HOME /", u, err)
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("made %s outside the root", entries[0].Name())
	}
}

func TestExecUser(t *testing.T) {
	workload := user{guest.DefaultUser, guest.WorkloadUID, guest.WorkloadGID, "/home/aleph"}
	cases := []struct {
		spec string
		want user
		err  bool
	}{
		{"", workload, false},
		{"aleph", workload, false},
		{"root", rootUser, false},
		{"0", rootUser, false},
		{"1234:55", user{"1234", 1234, 55, "/"}, false},
		{"mallory", user{}, true},
		{"aleph:x", user{}, true},
		{"1234:0", user{}, true},
	}
	for _, tc := range cases {
		got, err := execUser(workload, tc.spec)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("%q: got %+v, %v; want %+v (error %v)", tc.spec, got, err, tc.want, tc.err)
		}
	}
}

func TestWorkloadArgvAndEnv(t *testing.T) {
	bin := guest.Workload{Interface: guest.InterfaceBinary, Entrypoint: "bin/run", Args: []string{"-x", "y"}}
	if got := workloadArgv(bin, false); !slices.Equal(got, []string{"/opt/code/bin/run", "-x", "y"}) {
		t.Errorf("binary: %q", got)
	}
	asgi := guest.Workload{Interface: guest.InterfaceASGI, Entrypoint: "main:app"}
	want := []string{"python3", "-m", "uvicorn", "--app-dir", "/opt/code", "--host", "0.0.0.0", "--port", "8080", "main:app"}
	if got := workloadArgv(asgi, false); !slices.Equal(got, want) {
		t.Errorf("asgi: %q", got)
	}
	plain := guest.Workload{Interface: guest.InterfaceASGI, Entrypoint: "app"}
	if got := workloadArgv(plain, true); got[len(got)-1] != guest.PlainCodeModule+":app" {
		t.Errorf("plain asgi: %q", got)
	}

	env := workloadEnv(user{"aleph", 1000, 1000, "/home/aleph"}, "vm", map[string]string{"LANG": "fr_FR.UTF-8", "TOKEN": "x=y"})
	if !slices.IsSorted(env) || !slices.Contains(env, "LANG=fr_FR.UTF-8") || !slices.Contains(env, "TOKEN=x=y") ||
		!slices.Contains(env, "HOME=/home/aleph") || !slices.Contains(env, "HOSTNAME=vm") || slices.Contains(env, "LANG=C.UTF-8") {
		t.Errorf("env %q", env)
	}
}

func TestEtcFiles(t *testing.T) {
	cfg := guest.Config{Hostname: "vm", Network: &guest.Network{
		Address:  netip.MustParsePrefix("10.0.0.2/24"),
		Address6: netip.MustParsePrefix("fc00::2/64"),
		DNS:      []netip.Addr{netip.MustParseAddr("9.9.9.9"), netip.MustParseAddr("2620:fe::fe")},
	}}
	files := etcFiles(cfg)
	if files["/etc/hostname"] != "vm\n" ||
		files["/etc/resolv.conf"] != "nameserver 9.9.9.9\nnameserver 2620:fe::fe\n" ||
		!strings.Contains(files["/etc/hosts"], "10.0.0.2\tvm\n") || !strings.Contains(files["/etc/hosts"], "fc00::2\tvm\n") ||
		!strings.HasPrefix(files["/etc/hosts"], "127.0.0.1\tlocalhost\n") {
		t.Errorf("with network: %q", files)
	}
	files = etcFiles(guest.Config{Hostname: "vm"})
	if files["/etc/resolv.conf"] != "" || !strings.Contains(files["/etc/hosts"], "127.0.1.1\tvm\n") {
		t.Errorf("without network: %q", files)
	}
}

func TestProcParsers(t *testing.T) {
	if n := parseOOMKills([]byte("low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n")); n != 1 {
		t.Errorf("oom_kill = %d", n)
	}
	if n := parseOOMKills([]byte("low 0\n")); n != 0 {
		t.Errorf("no oom_kill line = %d", n)
	}
	m := parseMeminfo([]byte("MemTotal:        1000 kB\nMemAvailable:     500 kB\nHugePages_Total:       0\n"))
	if m["MemTotal"] != 1000*1024 || m["MemAvailable"] != 500*1024 || m["HugePages_Total"] != 0 {
		t.Errorf("meminfo %v", m)
	}
	if l := parseLoadavg([]byte("0.50 0.25 1.00 1/80 1234\n")); l != [3]float64{0.5, 0.25, 1} {
		t.Errorf("loadavg %v", l)
	}
	if d, ok := parseKmsgRun("6,312,3036524,-;Run /init as init process"); !ok || d != 3036524*time.Microsecond {
		t.Errorf("kmsg %v %v", d, ok)
	}
	if _, ok := parseKmsgRun("6,313,3036625,-;  with arguments:"); ok {
		t.Error("took another kernel line for the init's start")
	}
	cmdline := "console=ttyS0 root=/dev/vda ro quiet"
	if kernelArg(cmdline, "root") != "/dev/vda" || kernelArg(cmdline, "init") != "" || !hasKernelFlag(cmdline, "ro") || hasKernelFlag(cmdline, "rw") {
		t.Error("kernel command line parsing")
	}
}

func TestCountProcesses(t *testing.T) {
	proc := t.TempDir()
	for pid, stat := range map[string]string{
		"1":    "1 (alephvm-init) S 0 1 1",
		"2":    "2 (kthreadd) S 0 0 0",
		"9":    "9 (kworker/0:1) I 2 0 0",
		"40":   "40 (my (odd) name) S 1 40 40",
		"41":   "41 (sh) Z 40 40 40",
		"self": "x",
	} {
		os.MkdirAll(filepath.Join(proc, pid), 0o755)
		os.WriteFile(filepath.Join(proc, pid, "stat"), []byte(stat), 0o644)
	}
	all, zombies := countProcesses(proc)
	if all != 3 || zombies != 1 {
		t.Errorf("got %d processes, %d zombies; want 3 and 1", all, zombies)
	}
}

func TestMountOrder(t *testing.T) {
	cfg := guest.Config{
		Drives: []guest.Drive{
			{Role: guest.RoleRuntime, Mount: "/"},
			{Role: guest.RoleVolume, Mount: "/data/sub/deeper"},
			{Role: guest.RoleData, Mount: "/data"},
			{Role: guest.RoleCode, Mount: "/opt/code"},
		},
		Tmpfs: []guest.Tmpfs{{Mount: "/data/sub", SizeMiB: 1}},
	}
	var got []string
	for _, m := range mountOrder(cfg) {
		got = append(got, m.path)
	}
	if want := []string{"/data", "/opt/code", "/data/sub", "/data/sub/deeper"}; !slices.Equal(got, want) {
		t.Errorf("order %q, want %q", got, want)
	}
}

func TestCheckFormat(t *testing.T) {
	dir := t.TempDir()
	ext4 := make([]byte, 2048)
	ext4[1080], ext4[1081] = 0x53, 0xef
	files := map[guest.Format][]byte{
		guest.FormatSquashfs: append([]byte("hsqs"), make([]byte, 100)...),
		guest.FormatExt4:     ext4,
		guest.FormatZip:      []byte("PK\x05\x06" + strings.Repeat("\x00", 18)),
	}
	for format, content := range files {
		p := filepath.Join(dir, string(format))
		os.WriteFile(p, content, 0o644)
		if err := checkFormat(p, format); err != nil {
			t.Errorf("%s: %v", format, err)
		}
		for other := range files {
			if other != format {
				if err := checkFormat(p, other); err == nil || !strings.Contains(err.Error(), "out of order") {
					t.Errorf("%s taken for %s: %v", format, other, err)
				}
			}
		}
	}
}

func me() user { return user{name: "me", uid: os.Getuid(), gid: os.Getgid(), home: "/"} }

func zipReader(t *testing.T, build func(*zip.Writer)) *zip.Reader {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	build(zw)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	zr, err := zip.NewReader(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	return zr
}

func addFile(t *testing.T, zw *zip.Writer, name string, mode os.FileMode, content string) {
	t.Helper()
	hdr := &zip.FileHeader{Name: name}
	hdr.SetMode(mode)
	w, err := zw.CreateHeader(hdr)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(content))
}

func TestUnzip(t *testing.T) {
	zr := zipReader(t, func(zw *zip.Writer) {
		addFile(t, zw, "pkg/", os.ModeDir|0o755, "")
		addFile(t, zw, "pkg/main.py", 0o644, "print(1)\n")
		addFile(t, zw, "/bin/run", 0o755, "#!/bin/sh\n")
		addFile(t, zw, "link", os.ModeSymlink|0o777, "pkg/main.py")
	})
	dir := t.TempDir()
	if err := unzip(zr, dir, me()); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "link")); string(b) != "print(1)\n" {
		t.Errorf("through the symlink: %q", b)
	}
	if st, err := os.Stat(filepath.Join(dir, "bin/run")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("executable: %v %v", st, err)
	}

	escapes := map[string]func(*zip.Writer){
		"dot-dot": func(zw *zip.Writer) { addFile(t, zw, "../evil", 0o644, "x") },
		"symlink": func(zw *zip.Writer) {
			addFile(t, zw, "out", os.ModeSymlink|0o777, "/tmp")
			addFile(t, zw, "out/evil", 0o644, "x")
		},
	}
	for name, build := range escapes {
		parent := t.TempDir()
		dir := filepath.Join(parent, "code")
		os.Mkdir(dir, 0o755)
		if err := unzip(zipReader(t, build), dir, me()); err == nil {
			t.Errorf("%s: an entry escaped the directory", name)
		}
		if _, err := os.Stat(filepath.Join(parent, "evil")); err == nil {
			t.Errorf("%s: wrote outside the directory", name)
		}
	}
}

func TestLogRing(t *testing.T) {
	r := newLogRing(3, 1<<20)
	for _, l := range []string{"a", "b", "c", "d"} {
		r.add(guest.Stdout, l)
	}
	var got []string
	r.read(context.Background(), false, func(l guest.LogLine) error {
		got = append(got, l.Text)
		return nil
	})
	if !slices.Equal(got, []string{"b", "c", "d"}) {
		t.Errorf("kept %q", got)
	}

	small := newLogRing(100, 10)
	small.add(guest.Stdout, "123456")
	small.add(guest.Stdout, "789012")
	got = nil
	small.read(context.Background(), false, func(l guest.LogLine) error {
		got = append(got, l.Text)
		return nil
	})
	if !slices.Equal(got, []string{"789012"}) {
		t.Errorf("byte cap kept %q", got)
	}

	// copy splits the stream into lines, cuts overlong ones, repairs
	// invalid UTF-8 and echoes.
	r = newLogRing(100, 1<<20)
	var echo bytes.Buffer
	long := strings.Repeat("x", maxLogLine+10)
	r.copy(guest.Stderr, strings.NewReader("one\ntwo\xff\n"+long+"\nlast"), &echo)
	got = nil
	r.read(context.Background(), false, func(l guest.LogLine) error {
		if l.Stream != guest.Stderr {
			t.Errorf("stream %s", l.Stream)
		}
		got = append(got, l.Text)
		return nil
	})
	if len(got) != 5 || got[0] != "one" || got[1] != "two\uFFFD" || len(got[2]) != maxLogLine || got[4] != "last" {
		t.Errorf("lines %d: %q %q", len(got), got[0], got[1])
	}
	if echo.Len() != len("one\ntwo\xff\n"+long+"\nlast") {
		t.Errorf("echoed %d bytes", echo.Len())
	}

	// A follower sees new lines, and stops with its context.
	ctx, cancel := context.WithCancel(context.Background())
	lines := make(chan string, 10)
	done := make(chan error)
	go func() {
		done <- r.read(ctx, true, func(l guest.LogLine) error {
			lines <- l.Text
			return nil
		})
	}()
	for range 5 {
		<-lines
	}
	r.add(guest.Stdout, "new")
	if l := <-lines; l != "new" {
		t.Errorf("followed %q", l)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("follow ended with %v", err)
	}
}

func TestModuleLoader(t *testing.T) {
	index := "virtio - \nvirtio_ring lib/modules/virtio_ring.ko\nvirtio_pci lib/modules/virtio_pci.ko virtio virtio_ring\n" +
		"virtio_blk lib/modules/virtio_blk.ko virtio virtio_ring\nbroken lib/modules/broken.ko missing\n"
	mods, err := guest.ParseModuleIndex(strings.NewReader(index))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var loaded []string
	l := &moduleLoader{index: mods, loaded: map[string]*moduleLoad{}}
	l.insert = func(m guest.Module) error {
		mu.Lock()
		defer mu.Unlock()
		if slices.Contains(loaded, m.Name) {
			t.Errorf("%s loaded twice", m.Name)
		}
		loaded = append(loaded, m.Name)
		return nil
	}
	if err := l.loadAll("virtio_pci", "virtio_blk", "virtio_pci"); err != nil {
		t.Fatal(err)
	}
	if len(loaded) != 3 || loaded[0] != "virtio_ring" || slices.Contains(loaded, "virtio") {
		t.Errorf("loaded %q: want virtio_ring first, the built-in virtio never", loaded)
	}
	if err := l.load("broken"); err == nil || !strings.Contains(err.Error(), "missing is not in the initramfs") {
		t.Errorf("missing dependency: %v", err)
	}
}

func TestDeviceDetection(t *testing.T) {
	sys := t.TempDir()
	write := func(p, content string) {
		os.MkdirAll(filepath.Dir(filepath.Join(sys, p)), 0o755)
		os.WriteFile(filepath.Join(sys, p), []byte(content), 0o644)
	}
	write("bus/pci/devices/0000:00:01.0/vendor", "0x8086\n")
	if hasVirtioPCI(filepath.Join(sys, "bus/pci/devices")) {
		t.Error("an Intel device taken for virtio")
	}
	write("bus/pci/devices/0000:00:02.0/vendor", "0x1af4\n")
	if !hasVirtioPCI(filepath.Join(sys, "bus/pci/devices")) {
		t.Error("virtio PCI device not found")
	}
	if hasVirtioMMIO(filepath.Join(sys, "bus")) {
		t.Error("virtio-mmio found where there is none")
	}
	write("bus/acpi/devices/LNRO0005:00/path", "x")
	if !hasVirtioMMIO(filepath.Join(sys, "bus")) {
		t.Error("Firecracker's ACPI virtio-mmio devices not found")
	}
	write("bus/virtio/devices/virtio0/device", "0x0002\n")
	write("bus/virtio/devices/virtio1/device", "0x0013\n")
	write("bus/virtio/devices/virtio2/device", "0x0003\n")
	types, err := virtioTypes(filepath.Join(sys, "bus/virtio/devices"))
	if err != nil || !reflect.DeepEqual(types, map[int]bool{virtioBlock: true, virtioVsock: true, virtioConsole: true}) {
		t.Errorf("types %v %v", types, err)
	}
}

// TestReaper checks that the reaper gives a started process its exit
// status and reaps orphans, with the test process standing in for PID 1
// as a child subreaper.
func TestReaper(t *testing.T) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Skipf("cannot become a subreaper: %v", err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	r := newReaper()
	wait, err := r.start(exec.Command("/bin/sh", "-c", "sleep 0.2 & exit 3"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for r.reap() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case ws := <-wait:
		if code, sig := exitCode(ws); code != 3 || sig != 0 {
			t.Errorf("exit %d signal %d", code, sig)
		}
	default:
		t.Fatal("no exit status for the started process")
	}
	if r.reaped < 2 {
		t.Errorf("reaped %d processes, want the shell and its orphan", r.reaped)
	}
	if _, err := r.start(exec.Command("/nonexistent")); err == nil {
		t.Error("started a missing program")
	}

	sleep := exec.Command("sleep", "10")
	killed, err := r.start(sleep)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Kill(sleep.Process.Pid, syscall.SIGKILL)
	for r.reap() {
		time.Sleep(10 * time.Millisecond)
	}
	if code, sig := exitCode(<-killed); code != 137 || sig != 9 {
		t.Errorf("killed: exit %d signal %d", code, sig)
	}
}

func TestCappedBuffer(t *testing.T) {
	b := &cappedBuffer{max: 5}
	b.Write([]byte("abc"))
	b.Write([]byte("defg"))
	if string(b.Bytes()) != "abcde" || !b.truncated {
		t.Errorf("%q %v", b.Bytes(), b.truncated)
	}
}

// TestStatusesAreNumbered checks that every status the init reports, by
// answer or by event, is numbered after those before it.
func TestStatusesAreNumbered(t *testing.T) {
	in := newInit()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hello, events := in.Subscribe(ctx)
	answer := in.Status()
	in.failed(errors.New("no program"))
	ev := <-events
	later := in.Status()
	if !(hello.Seq < answer.Seq && answer.Seq < ev.Status.Seq && ev.Status.Seq < later.Seq) {
		t.Errorf("statuses numbered %d, %d, %d (event), %d: want increasing", hello.Seq, answer.Seq, ev.Status.Seq, later.Seq)
	}
}

// TestFullSubscriberGetsTheLastEvent checks that a subscriber that does
// not read loses its oldest events, not the exit that ends them.
func TestFullSubscriberGetsTheLastEvent(t *testing.T) {
	in := newInit()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, events := in.Subscribe(ctx)
	in.mu.Lock()
	for range 40 {
		in.emitLocked(guest.EventOOM)
	}
	in.state = guest.StateExited
	in.emitLocked(guest.EventExited)
	in.mu.Unlock()
	var last guest.Event
	for n := len(events); n > 0; n-- {
		last = <-events
	}
	if last.Type != guest.EventExited || last.Status.State != guest.StateExited {
		t.Errorf("the last event kept is %s (%s), want the exit", last.Type, last.Status.State)
	}
}
