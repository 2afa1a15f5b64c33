package main

import (
	"archive/zip"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

// The VM tests boot the real kernel, initramfs and runtime under QEMU
// (TCG), built by package assets into the test cache. The assets need the
// network (apt), so they are prepared before the tests move into their
// own network namespace, and the outcome is passed on in these variables.
const (
	assetsDirEnv = "ALEPHVM_TEST_ASSETS_DIR"
	assetsErrEnv = "ALEPHVM_TEST_ASSETS_ERROR"
)

var vmTools = []string{"qemu-system-x86_64", "qemu-img", "mksquashfs", "mkfs.ext4", "e2fsck", "mmdebstrap", "apt-get", "dpkg-deb", "go"}

func TestMain(m *testing.M) {
	flag.Parse()
	testassets.Prepare(false)
	if os.Geteuid() == 0 && !testenv.Isolated() && !testing.Short() {
		dir, err := prepareAssets()
		if err != nil {
			os.Setenv(assetsErrEnv, err.Error())
		} else {
			os.Setenv(assetsDirEnv, dir)
		}
	}
	testenv.RunIsolated(m)
}

// prepareAssets builds alephvm-init from this package and the assets
// around it, or finds them up to date.
func prepareAssets() (string, error) {
	for _, tool := range vmTools {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("needs %s, which is not installed (see scripts/test.sh)", tool)
		}
	}
	dir := filepath.Join(testenv.CachePath(), "assets")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	initBin := filepath.Join(dir, "alephvm-init")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", initBin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build alephvm-init: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	_, err := assets.Build(ctx, assets.Options{Dir: dir, Init: initBin, Runtime: true, Progress: prefixWriter{os.Stderr}})
	return dir, err
}

type prefixWriter struct{ w io.Writer }

func (p prefixWriter) Write(b []byte) (int, error) {
	for _, line := range strings.SplitAfter(string(b), "\n") {
		if line != "" {
			fmt.Fprint(p.w, "assets: "+line)
		}
	}
	return len(b), nil
}

// vmAssets returns the assets the VM tests boot, skipping the test where
// they cannot be had.
func vmAssets(t *testing.T) assets.Manifest {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs: not in -short mode")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, vmTools...)
	if msg := os.Getenv(assetsErrEnv); msg != "" {
		t.Fatalf("preparing the VM assets: %s", msg)
	}
	m, err := assets.Load(os.Getenv(assetsDirEnv))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func assetPath(t *testing.T, m assets.Manifest, name assets.Name) string {
	t.Helper()
	p, err := m.Path(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// vmSpec describes a VM to boot.
type vmSpec struct {
	kernel    string // bzImage or vmlinux
	initramfs string // path
	cfg       guest.Config
	drives    []string // files of cfg.Drives, in order
	tap       string   // host tap device, made by startVM
	host      netip.Prefix
	memMiB    int
	icount    bool // count guest time in emulated instructions
}

// testVM is a running QEMU.
type testVM struct {
	t       *testing.T
	cmd     *exec.Cmd
	client  *guest.Client
	started time.Time
	ready   time.Time // when the host saw the workload ready
	console *lockedBuffer
	exited  chan struct{}
	exitErr error
	url     string
	control string // the control socket
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// qemuArgs returns QEMU's command line for spec: q35 under TCG, the
// kernel and initramfs, the config drive then the drives as virtio block
// devices in order, the control port as a unix socket, one NIC on the
// tap, and power-off ending QEMU.
func qemuArgs(spec vmSpec, configDrive, controlSocket string) []string {
	args := []string{
		"-accel", "tcg", "-M", "q35", "-cpu", "max", "-smp", qemu.SMP(1, "tcg"), "-m", fmt.Sprint(spec.memMiB),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-serial", "stdio",
		"-kernel", spec.kernel, "-initrd", spec.initramfs, "-append", qemu.KernelCmdline(hypervisor.Spec{VCPUs: 1, Boot: hypervisor.Boot{Cmdline: strings.TrimSpace(guest.KernelCmdline + " " + os.Getenv("ALEPHVM_TEST_KERNEL_ARGS"))}}, "tcg"),
		"-drive", "file=" + configDrive + ",if=none,id=drive0,format=raw,readonly=on",
		"-device", "virtio-blk-pci,drive=drive0",
	}
	for i, file := range spec.drives {
		ro := "on"
		if !spec.cfg.Drives[i].ReadOnly && spec.cfg.Drives[i].Format == guest.FormatExt4 {
			ro = "off"
		}
		id := fmt.Sprintf("drive%d", i+1)
		args = append(args, "-drive", "file="+file+",if=none,id="+id+",format=raw,readonly="+ro, "-device", "virtio-blk-pci,drive="+id)
	}
	args = append(args,
		"-device", "virtio-serial-pci",
		"-chardev", "socket,id=control,path="+controlSocket+",server=on,wait=off",
		"-device", "virtserialport,chardev=control,name="+guest.ControlPortName,
	)
	if spec.tap != "" {
		// No option ROM: the kernel is loaded directly, iPXE would only cost
		// firmware time.
		args = append(args, "-netdev", "tap,id=net0,ifname="+spec.tap+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=net0,romfile=")
	}
	if spec.icount {
		args = append(args, "-icount", "shift=0")
	}
	return args
}

// makeTap creates a tap in the test's network namespace with the host's
// address on it.
func makeTap(t *testing.T, name string, host netip.Prefix) {
	t.Helper()
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR}
	if err := netlink.LinkAdd(tap); err != nil {
		t.Fatalf("create tap %s: %v", name, err)
	}
	t.Cleanup(func() { netlink.LinkDel(tap) })
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: host.Addr().AsSlice(), Mask: net.CIDRMask(host.Bits(), 32)}}
	if err := netlink.AddrAdd(tap, addr); err != nil {
		t.Fatalf("address %s on %s: %v", host, name, err)
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		t.Fatalf("%s up: %v", name, err)
	}
}

// startVM boots spec and connects to its init; it does not wait for the
// workload.
func startVM(t *testing.T, spec vmSpec) *testVM {
	t.Helper()
	dir := t.TempDir()
	configDrive := filepath.Join(dir, "config.img")
	if err := guest.WriteConfigDrive(configDrive, spec.cfg); err != nil {
		t.Fatal(err)
	}
	if spec.tap != "" {
		makeTap(t, spec.tap, spec.host)
	}
	controlSocket := filepath.Join(dir, "control.sock")
	vm := &testVM{t: t, console: &lockedBuffer{}, exited: make(chan struct{}), control: controlSocket}
	if spec.cfg.Network != nil {
		vm.url = fmt.Sprintf("http://%s:%d", spec.cfg.Network.Address.Addr(), guest.Port)
	}
	vm.cmd = exec.Command("qemu-system-x86_64", qemuArgs(spec, configDrive, controlSocket)...)
	vm.cmd.Stdout, vm.cmd.Stderr = vm.console, vm.console
	vm.started = time.Now()
	if err := vm.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		vm.exitErr = vm.cmd.Wait()
		close(vm.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-vm.exited:
		default:
			vm.cmd.Process.Kill()
			<-vm.exited
		}
		if t.Failed() || os.Getenv("ALEPHVM_TEST_CONSOLE") != "" {
			t.Logf("console of the VM:\n%s", vm.console.String())
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var conn net.Conn
	for {
		var err error
		if conn, err = guest.DialSerial(ctx, controlSocket); err == nil {
			break
		}
		select {
		case <-vm.exited:
			t.Fatalf("QEMU exited: %v", vm.exitErr)
		case <-ctx.Done():
			t.Fatalf("control socket: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	client, err := guest.NewClient(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	vm.client = client
	t.Cleanup(func() { client.Close() })
	return vm
}

// reconnect closes the control session and opens another, as a host
// that restarts does.
func (vm *testVM) reconnect() guest.Hello {
	vm.t.Helper()
	vm.client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := guest.DialSerial(ctx, vm.control)
	if err != nil {
		vm.t.Fatal(err)
	}
	client, err := guest.NewClient(ctx, conn)
	if err != nil {
		vm.t.Fatalf("second session: %v", err)
	}
	vm.client = client
	vm.t.Cleanup(func() { client.Close() })
	return client.Hello()
}

// waitSettled waits until the workload is ready (or will never be).
func (vm *testVM) waitSettled() guest.Status {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	st, err := vm.client.WaitFor(ctx, guest.Settled)
	if err != nil {
		vm.t.Fatalf("waiting for the workload: %v (status %+v)", err, st)
	}
	vm.ready = time.Now()
	return st
}

// waitReady waits for the workload to be ready and logs where the boot's
// time went.
func (vm *testVM) waitReady() guest.Status {
	vm.t.Helper()
	st := vm.waitSettled()
	if st.State != guest.StateReady {
		vm.t.Fatalf("workload not ready: %+v", st)
	}
	vm.reportBoot(st)
	return st
}

// waitExit waits for QEMU to end.
func (vm *testVM) waitExit(timeout time.Duration) error {
	select {
	case <-vm.exited:
		return vm.exitErr
	case <-time.After(timeout):
		return fmt.Errorf("QEMU still runs %v later", timeout)
	}
}

// get fetches a path of the workload over the tap.
func (vm *testVM) get(path string) (int, string) {
	vm.t.Helper()
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Get(vm.url + path)
	if err != nil {
		vm.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// fire requests a path of the workload without waiting for an answer,
// for requests that end it.
func (vm *testVM) fire(path string) {
	go func() {
		client := &http.Client{Timeout: 30 * time.Second}
		if resp, err := client.Get(vm.url + path); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
}

// exec runs a command in the guest.
func (vm *testVM) exec(req guest.ExecRequest) guest.ExecResult {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := vm.client.Exec(ctx, req)
	if err != nil {
		vm.t.Fatal(err)
	}
	return res
}

// reportBoot logs where the boot's time went.
func (vm *testVM) reportBoot(st guest.Status) {
	b := st.Boot
	total := vm.ready.Sub(vm.started)
	vm.t.Logf("QEMU start to ready seen by the host: %v; before the kernel's clock started (firmware, kernel load and decompression): %v; %s; init's own time %v",
		total.Round(time.Millisecond), (total - b.Ready).Round(time.Millisecond), bootSummary(b), ms(b.Started-b.Kernel-b.ModuleWait))
}

// zipOf makes a zip archive of files (name to content; names ending in
// "*" are executable, without the star).
func zipOf(t *testing.T, files map[string]string) string {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, content := range files {
		hdr := &zip.FileHeader{Name: strings.TrimSuffix(name, "*"), Method: zip.Deflate}
		hdr.SetMode(0o644)
		if strings.HasSuffix(name, "*") {
			hdr.SetMode(0o755)
		}
		w, err := zw.CreateHeader(hdr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, content)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "archive.zip")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// treeOf writes files into a new directory.
func treeOf(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// squashfsOf makes a squashfs image of a directory.
func squashfsOf(t *testing.T, dir string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "image.squashfs")
	run(t, "mksquashfs", dir, img, "-noappend", "-quiet", "-no-progress", "-all-root")
	return img
}

// ext4Of makes an ext4 image of sizeMiB holding dir.
func ext4Of(t *testing.T, dir string, sizeMiB int) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "volume.ext4")
	run(t, "mkfs.ext4", "-q", "-F", "-d", dir, img, fmt.Sprintf("%dM", sizeMiB))
	return img
}

// payloadDrive makes the drive image of a zip or file payload.
func payloadDrive(t *testing.T, payload string) (drive string, size int64) {
	t.Helper()
	drive = filepath.Join(t.TempDir(), "payload.img")
	size, err := guest.PayloadDrive(payload, drive)
	if err != nil {
		t.Fatal(err)
	}
	return drive, size
}
