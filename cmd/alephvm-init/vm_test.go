package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/internal/testassets"
)

// TestBinaryProgram boots one VM with a binary program (zip code, zip
// data, an immutable squashfs volume, a persistent ext4 volume and a
// tmpfs) and checks, in turn: the workload answers on 8080 as the
// unprivileged user with its variables; the drives are where they should
// be; exec, logs, a forwarded signal, sysinfo; orphans are reaped; an OOM
// kill is reported; halt unmounts the persistent volume cleanly and QEMU
// exits.
func TestBinaryProgram(t *testing.T) {
	m := vmAssets(t)
	t.Parallel()
	workload := filepath.Join(t.TempDir(), "workload")
	build := exec.Command("go", "build", "-o", workload, "./testdata/workload")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the workload: %v\n%s", err, out)
	}
	bin, err := os.ReadFile(workload)
	if err != nil {
		t.Fatal(err)
	}
	code, codeSize := payloadDrive(t, zipOf(t, map[string]string{"bin/server*": string(bin), "README": "code"}))
	data, dataSize := payloadDrive(t, zipOf(t, map[string]string{"input.txt": "some input\n"}))
	immutable := squashfsOf(t, treeOf(t, map[string]string{"model.bin": "weights\n"}))
	persistent := ext4Of(t, treeOf(t, map[string]string{"kept.txt": "from before\n"}), 64)

	cfg := guest.Config{
		Version:  guest.ConfigVersion,
		Hostname: "binary-vm",
		Network: &guest.Network{
			Address: netip.MustParsePrefix("10.0.2.2/24"),
			Gateway: netip.MustParseAddr("10.0.2.1"),
			MTU:     1400,
			DNS:     []netip.Addr{netip.MustParseAddr("10.0.2.1")},
		},
		Workload: guest.Workload{
			Interface:  guest.InterfaceBinary,
			Entrypoint: "bin/server",
			Variables:  map[string]string{"GREETING": "hi there"},
		},
		Drives: []guest.Drive{
			{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true},
			{Role: guest.RoleCode, Format: guest.FormatZip, Mount: "/opt/code", ReadOnly: true, Size: codeSize},
			{Role: guest.RoleData, Format: guest.FormatZip, Mount: "/data", Size: dataSize},
			{Role: guest.RoleVolume, Format: guest.FormatSquashfs, Mount: "/mnt/model", ReadOnly: true},
			{Role: guest.RoleVolume, Format: guest.FormatExt4, Mount: "/var/lib/store", Persistent: true, Name: "store"},
		},
		Tmpfs: []guest.Tmpfs{{Mount: "/scratch", SizeMiB: 8}},
	}
	vm := startVM(t, vmSpec{
		kernel:    assetPath(t, m, assets.KernelBzImage),
		initramfs: assetPath(t, m, assets.Initramfs),
		cfg:       cfg,
		drives:    []string{assetPath(t, m, assets.Runtime), code, data, immutable, persistent},
		tap:       "tap0",
		host:      netip.MustParsePrefix("10.0.2.1/24"),
		memMiB:    384,
	})
	vm.waitReady()

	t.Run("http", func(t *testing.T) {
		if code, body := vm.get("/"); code != 200 || body != "hello from binary-vm as 1000:1000\n" {
			t.Errorf("GET / = %d %q", code, body)
		}
		if _, body := vm.get("/env?name=GREETING"); body != "hi there" {
			t.Errorf("variable GREETING = %q", body)
		}
	})
	t.Run("drives", func(t *testing.T) {
		for path, want := range map[string]string{
			"/data/input.txt":           "some input\n",
			"/mnt/model/model.bin":      "weights\n",
			"/var/lib/store/kept.txt":   "from before\n",
			"/opt/code/README":          "code",
			"/etc/hostname":             "binary-vm\n",
			"/etc/resolv.conf":          "nameserver 10.0.2.1\n",
			"/sys/class/net/eth0/mtu":   "1400\n",
			"/proc/sys/kernel/hostname": "binary-vm\n",
		} {
			if code, body := vm.get("/read?path=" + path); code != 200 || body != want {
				t.Errorf("%s: %d %q, want %q", path, code, body, want)
			}
		}
		for path, writable := range map[string]bool{
			"/var/lib/store/new.txt": true, "/scratch/x": true, "/data/output.txt": true, "/tmp/x": true,
			"/mnt/model/x": false, "/etc/x": false,
		} {
			code, body := vm.get("/write?data=written&path=" + path)
			if (code == 200) != writable {
				t.Errorf("write %s: %d %s", path, code, body)
			}
		}
	})
	t.Run("exec", func(t *testing.T) {
		res := vm.exec(guest.ExecRequest{Argv: []string{"sh", "-c", "id -u; pwd; echo oops >&2; exit 7"}})
		if res.ExitCode != 7 || string(res.Stdout) != "1000\n/opt/code\n" || string(res.Stderr) != "oops\n" {
			t.Errorf("exec: %+v (stdout %q, stderr %q)", res, res.Stdout, res.Stderr)
		}
		res = vm.exec(guest.ExecRequest{Argv: []string{"cat"}, User: "root", Stdin: []byte("as root\n")})
		if res.ExitCode != 0 || string(res.Stdout) != "as root\n" {
			t.Errorf("exec as root with stdin: %+v", res)
		}
		res = vm.exec(guest.ExecRequest{Argv: []string{"sleep", "30"}, Timeout: 200 * time.Millisecond})
		if !res.TimedOut || res.Signal != int(syscall.SIGKILL) {
			t.Errorf("exec past its timeout: %+v", res)
		}
	})
	t.Run("signal and logs", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := vm.client.Signal(ctx, syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		found := map[string]guest.Stream{}
		for !strings.Contains(strings.Join(keys(found), "|"), "got signal: user defined signal 1") {
			if ctx.Err() != nil {
				t.Fatalf("the workload did not log the signal; logs: %v", found)
			}
			time.Sleep(50 * time.Millisecond)
			if err := vm.client.Logs(ctx, false, func(l guest.LogLine) { found[l.Text] = l.Stream }); err != nil {
				t.Fatal(err)
			}
		}
		if found["workload starting"] != guest.Stdout || found["workload stderr line"] != guest.Stderr {
			t.Errorf("logs: %v", found)
		}
	})
	t.Run("zombies", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		before, err := vm.client.Sysinfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if code, body := vm.get("/orphans?n=20"); code != 200 {
			t.Fatalf("orphans: %d %s", code, body)
		}
		for {
			info, err := vm.client.Sysinfo(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if info.Zombies == 0 && info.Processes <= before.Processes {
				t.Logf("sysinfo: %d processes, %d zombies, %d CPUs, %d MiB available, mounts %+v",
					info.Processes, info.Zombies, info.CPUs, info.MemAvailable>>20, info.Mounts)
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("orphans not reaped: %d processes (%d before), %d zombies", info.Processes, before.Processes, info.Zombies)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	t.Run("oom", func(t *testing.T) {
		vm.fire("/oom")
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		st, err := vm.client.WaitFor(ctx, func(s guest.Status) bool { return s.State == guest.StateExited })
		if err != nil {
			t.Fatalf("%v: %+v", err, st)
		}
		if !st.OOMKilled || st.ExitCode == nil || *st.ExitCode != 128+9 {
			t.Errorf("after an OOM kill: %+v", st)
		}
	})
	t.Run("halt", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := vm.client.Halt(ctx); err != nil {
			t.Fatal(err)
		}
		if err := vm.waitExit(30 * time.Second); err != nil {
			t.Fatalf("QEMU after halt: %v", err)
		}
		out, err := exec.Command("e2fsck", "-fn", persistent).CombinedOutput()
		if err != nil {
			t.Errorf("the persistent volume is not clean: %v\n%s", err, out)
		}
		dump := run(t, "debugfs", "-R", "cat /new.txt", persistent)
		if !strings.Contains(dump, "written") {
			t.Errorf("the write to the persistent volume was lost: %q", dump)
		}
	})
}

// TestASGIProgram boots an ASGI program (squashfs code) with the
// uncompressed vmlinux, checks that uvicorn serves it on 8080, that a
// crash is reported with its exit code, and that halt ends QEMU.
func TestASGIProgram(t *testing.T) {
	m := vmAssets(t)
	t.Parallel()
	code := squashfsOf(t, treeOf(t, map[string]string{"main.py": asgiApp}))
	cfg := guest.Config{
		Version:  guest.ConfigVersion,
		Hostname: "asgi-vm",
		Network: &guest.Network{
			Address: netip.MustParsePrefix("10.0.3.2/24"), Gateway: netip.MustParseAddr("10.0.3.1"),
			Address6: netip.MustParsePrefix("fc00:3::2/64"), Gateway6: netip.MustParseAddr("fc00:3::1"),
		},
		Workload: guest.Workload{Interface: guest.InterfaceASGI, Entrypoint: "main:app", Variables: map[string]string{"NAME": "asgi"}},
		Drives: []guest.Drive{
			{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true},
			{Role: guest.RoleCode, Format: guest.FormatSquashfs, Mount: "/opt/code", ReadOnly: true},
		},
	}
	vm := startVM(t, vmSpec{
		kernel:    assetPath(t, m, assets.KernelVmlinux),
		initramfs: assetPath(t, m, assets.Initramfs),
		cfg:       cfg,
		drives:    []string{assetPath(t, m, assets.Runtime), code},
		tap:       "tap1",
		host:      netip.MustParsePrefix("10.0.3.1/24"),
		memMiB:    384,
	})
	vm.waitReady()
	if code, body := vm.get("/"); code != 200 || body != "hello from asgi as uid 1000" {
		t.Errorf("GET / = %d %q", code, body)
	}
	// A host that reconnects finds the state it left.
	if h := vm.reconnect(); h.Status.State != guest.StateReady || h.Status.PID == 0 {
		t.Errorf("hello of a second session: %+v", h)
	}
	// IPv6: the address on eth0 (index 2, /64, global scope) and the
	// default route.
	res := vm.exec(guest.ExecRequest{Argv: []string{"cat", "/proc/net/if_inet6", "/proc/net/ipv6_route"}})
	if out := string(res.Stdout); !strings.Contains(out, "fc000003000000000000000000000002 02 40 00 ") ||
		!strings.Contains(out, "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fc000003000000000000000000000001") {
		t.Errorf("IPv6 address or route missing:\n%s", out)
	}
	vm.fire("/crash")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := vm.client.WaitFor(ctx, func(s guest.Status) bool { return s.State == guest.StateExited })
	if err != nil || st.ExitCode == nil || *st.ExitCode != 3 || st.OOMKilled {
		t.Errorf("after a crash: %+v %v", st, err)
	}
	if err := vm.client.Halt(ctx); err != nil {
		t.Fatal(err)
	}
	if err := vm.waitExit(30 * time.Second); err != nil {
		t.Errorf("QEMU after halt: %v", err)
	}
}

// asgiApp is a bare ASGI application: no framework beyond the runtime's.
const asgiApp = `import os

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/crash":
        os._exit(3)
    body = f"hello from {os.environ['NAME']} as uid {os.getuid()}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
`

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestBaseImageBoots boots the instance base image's bare ext4 root
// (package baseimage) with our kernel and initramfs (root=/dev/vda: the
// init's instance mode, as the reference boots Firecracker instances)
// until systemd starts, behind a throw-away qcow2 overlay. The node boots
// both of the image's forms with their own kernel (package instance).
func TestBaseImageBoots(t *testing.T) {
	m := vmAssets(t)
	img := testassets.BaseImage(t)
	t.Parallel()
	root := overlay(t, img.Ext4)
	bootUntil(t, []string{"-accel", "tcg", "-M", "q35", "-cpu", "max", "-m", "768", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
		"-kernel", assetPath(t, m, assets.KernelBzImage), "-initrd", assetPath(t, m, assets.Initramfs),
		"-append", guest.KernelCmdline + " root=/dev/vda systemd.show_status=1",
		"-drive", "file=" + root + ",if=virtio,format=qcow2"}, "Welcome to", 4*time.Minute)
}

// overlay returns a qcow2 overlay of a raw image, so that a boot leaves
// the image as it was.
func overlay(t *testing.T, image string) string {
	t.Helper()
	ov := filepath.Join(t.TempDir(), "overlay.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image, ov)
	return ov
}

// bootUntil runs QEMU until its console shows want, then stops it.
func bootUntil(t *testing.T, args []string, want string, timeout time.Duration) {
	t.Helper()
	console := &lockedBuffer{}
	cmd := exec.Command("qemu-system-x86_64", args...)
	cmd.Stdout, cmd.Stderr = console, console
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	for !strings.Contains(console.String(), want) {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("QEMU exited (%v) before %q:\n%s", err, want, console.String())
		case <-time.After(200 * time.Millisecond):
		}
		if time.Since(start) > timeout {
			t.Fatalf("no %q on the console after %v:\n%s", want, timeout, console.String())
		}
	}
	t.Logf("%q after %v", want, time.Since(start).Round(100*time.Millisecond))
}

// TestBootTime measures boots of a small binary program (squashfs code,
// network, the control port), ALEPHVM_BOOT_RUNS times in a row, and logs
// the median of each step. With ALEPHVM_QEMU_ICOUNT=1, QEMU counts guest
// time in emulated instructions (-icount shift=0). Run it alone on the
// machine; docs/guest-init.md has the numbers.
func TestBootTime(t *testing.T) {
	runs, _ := strconv.Atoi(os.Getenv("ALEPHVM_BOOT_RUNS"))
	if runs <= 0 {
		t.Skip("set ALEPHVM_BOOT_RUNS to measure boots")
	}
	m := vmAssets(t)
	workload := filepath.Join(t.TempDir(), "code", "server")
	build := exec.Command("go", "build", "-o", workload, "./testdata/workload")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the workload: %v\n%s", err, out)
	}
	code := squashfsOf(t, filepath.Dir(workload))
	icount := os.Getenv("ALEPHVM_QEMU_ICOUNT") != ""
	steps := map[string][]time.Duration{}
	var order []string
	add := func(name string, d time.Duration) {
		if _, ok := steps[name]; !ok {
			order = append(order, name)
		}
		steps[name] = append(steps[name], d)
	}
	for i := range runs {
		t.Run(fmt.Sprint(i), func(t *testing.T) { // its cleanup removes the tap before the next
			vm := startVM(t, vmSpec{
				kernel:    assetPath(t, m, assets.KernelBzImage),
				initramfs: assetPath(t, m, assets.Initramfs),
				cfg: guest.Config{
					Version: guest.ConfigVersion, Hostname: "bench",
					Network:  &guest.Network{Address: netip.MustParsePrefix("10.0.5.2/24"), Gateway: netip.MustParseAddr("10.0.5.1")},
					Workload: guest.Workload{Interface: guest.InterfaceBinary, Entrypoint: "server"},
					Drives: []guest.Drive{
						{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true},
						{Role: guest.RoleCode, Format: guest.FormatSquashfs, Mount: "/opt/code", ReadOnly: true},
					},
				},
				drives: []string{assetPath(t, m, assets.Runtime), code},
				tap:    "tapb",
				host:   netip.MustParsePrefix("10.0.5.1/24"),
				memMiB: 384,
				icount: icount,
			})
			st := vm.waitSettled()
			if st.State != guest.StateReady {
				t.Fatalf("run %d: %+v", i, st)
			}
			b := st.Boot
			if !icount {
				total := vm.ready.Sub(vm.started)
				add("QEMU start to ready (host)", total)
				add("  firmware, kernel load and decompression", total-b.Ready)
			}
			add("  kernel, to /init", b.Kernel)
			add("  init: Go runtime start", b.InitStart-b.Kernel)
			add("  init: device modules", b.Modules-b.InitStart)
			add("  init: config drive", b.Config-b.Modules)
			add("  init: mounts and root switch", b.Mounts-b.Config)
			add("  init: hostname, /etc, network", b.Network-b.Mounts)
			add("  init: workload exec", b.Started-b.Network)
			add("  workload start to port 8080 accepting", b.Ready-b.Started)
			add("guest clock at ready", b.Ready)
			add("init's own time (started - kernel - module wait)", b.Started-b.Kernel-b.ModuleWait)
			add("module wait", b.ModuleWait)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			if err := vm.client.Halt(ctx); err != nil {
				t.Fatal(err)
			}
			cancel()
			if err := vm.waitExit(30 * time.Second); err != nil {
				t.Fatal(err)
			}
		})
	}
	if t.Failed() {
		return
	}
	var report strings.Builder
	fmt.Fprintf(&report, "median of %d boots (icount %v):\n", runs, icount)
	for _, name := range order {
		d := slices.Clone(steps[name])
		slices.Sort(d)
		fmt.Fprintf(&report, "%-50s %8v  (min %v, max %v)\n", name, ms(d[len(d)/2]), ms(d[0]), ms(d[len(d)-1]))
	}
	t.Log(report.String())
}
