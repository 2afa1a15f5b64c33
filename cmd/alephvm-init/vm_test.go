package main

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/guest"
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
	code := zipOf(t, map[string]string{"bin/server*": string(bin), "README": "code"})
	data := zipOf(t, map[string]string{"input.txt": "some input\n"})
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
			{Role: guest.RoleCode, Format: guest.FormatZip, Mount: "/opt/code", ReadOnly: true, Size: fileSize(t, code)},
			{Role: guest.RoleData, Format: guest.FormatZip, Mount: "/data", Size: fileSize(t, data)},
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
	st := vm.waitSettled()
	if st.State != guest.StateReady {
		t.Fatalf("workload not ready: %+v", st)
	}
	vm.reportBoot(st)

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
		Network:  &guest.Network{Address: netip.MustParsePrefix("10.0.3.2/24"), Gateway: netip.MustParseAddr("10.0.3.1")},
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
	st := vm.waitSettled()
	if st.State != guest.StateReady {
		t.Fatalf("workload not ready: %+v", st)
	}
	vm.reportBoot(st)
	if code, body := vm.get("/"); code != 200 || body != "hello from asgi as uid 1000" {
		t.Errorf("GET / = %d %q", code, body)
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
