package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/internal/proxybench"
	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/network"
)

// BenchmarkPrograms measures, in one run, for examples/go-hello under QEMU:
//   - cold start through the node (first request to /vm/<hash>/ until its
//     answer) divided by a bare QEMU boot of the same kernel, initramfs,
//     runtime and code until the same answer;
//   - warm requests per second through the node divided by the same
//     requests sent straight to the VM.
//
// Run it as root: go test -run NONE -bench Programs -benchtime 1x ./cmd/alephvm
func BenchmarkPrograms(b *testing.B) {
	assetsDir := testassets.ProgramAssets(b)
	testenv.RequireTools(b, "qemu-system-x86_64", "nft", "mkfs.ext4", "go")
	dir, port, env := nodeEnv(b, "lo", "10.0.0.53")
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_REUSE_TIMEOUT=600", "ALEPH_VM_LOG_LEVEL=warn")
	codeDir := filepath.Join(dir, "go-hello")
	os.MkdirAll(codeDir, 0o755)
	build := exec.Command("go", "build", "-o", filepath.Join(codeDir, "hello"), "../../examples/go-hello")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build the Go example: %v\n%s", err, out)
	}
	manifest, err := assets.Load(assetsDir)
	if err != nil {
		b.Fatal(err)
	}
	var cold, bare time.Duration
	var nodeRPS, directRPS float64
	for range b.N {
		bare += bareBoot(b, manifest, codeDir, filepath.Join(dir, "bare"))
		node := startNode(b, env, port)
		code, out, errOut := runCLI(b, env, "program", "create", codeDir, "--entrypoint", "hello", "--interface", "binary")
		if code != 0 {
			b.Fatalf("create: %s %s", out, errOut)
		}
		ref := strings.Fields(out)[0]
		start := time.Now()
		if status, body := httpGet(b, programURL(port, ref, "/")); status != 200 {
			b.Fatalf("cold request: %d %s", status, body)
		}
		cold += time.Since(start)
		vm := listVMs(b, port)[ref].Networking.IPv4
		nodeRPS += requestsPerSecond(b, programURL(port, ref, "/"))
		directRPS += requestsPerSecond(b, "http://"+vm+":8080/")
		node.cmd.Process.Signal(syscall.SIGTERM) // stops its program VMs
		node.cmd.Wait()
	}
	n := float64(b.N)
	b.ReportMetric(cold.Seconds()/n, "s/cold-via-node")
	b.ReportMetric(bare.Seconds()/n, "s/cold-bare")
	b.ReportMetric(cold.Seconds()/bare.Seconds(), "cold-ratio")
	b.ReportMetric(nodeRPS/n, "req/s-via-node")
	b.ReportMetric(directRPS/n, "req/s-direct")
	b.ReportMetric(nodeRPS/directRPS, "warm-ratio")
}

// requestsPerSecond sends 400 GETs to url from 8 clients.
func requestsPerSecond(b testing.TB, url string) float64 {
	const total, clients = 400, 8
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	var wg sync.WaitGroup
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range total / clients {
				resp, err := client.Get(url)
				if err != nil {
					b.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	return total / time.Since(start).Seconds()
}

// bareBoot boots the program's VM without the node: its config drive, tap
// and QEMU made here, until the program answers on 8080.
func bareBoot(b testing.TB, m assets.Manifest, codeDir, dir string) time.Duration {
	ctx := context.Background()
	os.MkdirAll(dir, 0o755)
	path := func(name assets.Name) string {
		p, err := m.Path(name)
		if err != nil {
			b.Fatal(err)
		}
		return p
	}
	code, err := packCode(ctx, codeDir, "zip")
	if err != nil {
		b.Fatal(err)
	}
	defer os.Remove(code)
	st, _ := os.Stat(code)
	host, guestAddr := netip.MustParsePrefix("172.31.250.1/24"), netip.MustParsePrefix("172.31.250.2/24")
	if err := network.CreateTap("avm9999", host); err != nil {
		b.Fatal(err)
	}
	defer network.DeleteTap("avm9999")
	cfg := guest.Config{Version: guest.ConfigVersion, Hostname: "bare",
		Network:  &guest.Network{Address: guestAddr, Gateway: host.Addr()},
		Workload: guest.Workload{Interface: guest.InterfaceBinary, Entrypoint: "hello"},
		Drives: []guest.Drive{
			{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true},
			{Role: guest.RoleCode, Format: guest.FormatZip, Mount: "/opt/code", ReadOnly: true, Size: st.Size()},
		}}
	cfgPath := filepath.Join(dir, "config.img")
	if err := guest.WriteConfigDrive(cfgPath, cfg); err != nil {
		b.Fatal(err)
	}
	driver, err := qemu.New(ctx, qemu.Options{Accel: "tcg"}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		b.Fatal(err)
	}
	mac := network.Allocation{Guest: guestAddr.Addr()}.MAC()
	start := time.Now()
	vm, err := driver.Start(ctx, hypervisor.Spec{Name: "bare", Dir: dir, VCPUs: 1, MemoryMiB: 256,
		Boot:   hypervisor.Boot{Kernel: path(assets.KernelBzImage), Initrd: path(assets.Initramfs), Cmdline: guest.KernelCmdline},
		Drives: []hypervisor.Drive{{Path: cfgPath, ReadOnly: true}, {Path: path(assets.Runtime), ReadOnly: true}, {Path: code, ReadOnly: true}},
		NICs:   []hypervisor.NIC{{Tap: "avm9999", MAC: mac}}, RebootExits: true})
	if err != nil {
		b.Fatal(err)
	}
	defer vm.Stop(ctx, nil, hypervisor.StopTimeouts{Quit: 5 * time.Second, Kill: 5 * time.Second})
	url := fmt.Sprintf("http://%s:8080/", guestAddr.Addr())
	client := &http.Client{Timeout: time.Second}
	for deadline := start.Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if resp, err := client.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return time.Since(start)
			}
		}
	}
	b.Fatalf("bare VM did not answer; console: %s", vm.ConsoleLog())
	return 0
}

// BenchmarkProgramProxyVsNginx is the proxy comparison of issue 16 with a
// real VM: examples/go-hello booted by the node under QEMU, then wrk -t2
// at 32 and at 200 connections through the node, through nginx with a
// keepalive upstream to the same VM (what an operator would otherwise put
// in front), through a bare Go proxy of the fast path's design
// (proxybench.StartBare) and straight to the VM, interleaved; it reports
// the medians and the node's rate over each other's. It skips without
// nginx.
//
//	go test -run NONE -bench ProgramProxyVsNginx -benchtime 1x ./cmd/alephvm
func BenchmarkProgramProxyVsNginx(b *testing.B) {
	assetsDir := testassets.ProgramAssets(b)
	testenv.RequireTools(b, "qemu-system-x86_64", "nft", "mkfs.ext4", "go")
	nginx, err := exec.LookPath("nginx")
	if err != nil {
		if nginx, err = exec.LookPath("/usr/sbin/nginx"); err != nil {
			b.Skip("nginx is not installed (apt-get install nginx-light): the comparison needs it")
		}
	}
	dir, port, env := nodeEnv(b, "lo", "10.0.0.53")
	// info: the VM's boots and stops, nothing per request.
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_REUSE_TIMEOUT=600", "ALEPH_VM_LOG_LEVEL=info")
	node := startNode(b, env, port)
	defer func() {
		if b.Failed() {
			// Whether the VM went away, and why, or stalled.
			b.Logf("the node's log:\n%s", node.logs.String())
		}
		node.cmd.Process.Signal(syscall.SIGTERM) // stops its program VMs
		node.cmd.Wait()
	}()
	ref := createGoHello(b, env, dir)
	if status, body := httpGet(b, programURL(port, ref, "/")); status != 200 {
		b.Fatalf("cold request: %d %s", status, body)
	}
	vm := listVMs(b, port)[ref].Networking.IPv4
	prefix := "/vm/" + ref + "/"
	viaNginx, nginxPID := proxybench.StartNginx(b, nginx, vm+":8080", prefix)
	targets := []proxybench.Target{
		{Name: "node", URL: programURL(port, ref, "/"), Proc: node.cmd.Process.Pid},
		{Name: "nginx", URL: viaNginx, Proc: nginxPID, Children: true},
		// The least a Go proxy of the fast path's design does, in this
		// (otherwise idle) process: what the node adds shows against it.
		{Name: "bare", URL: "http://" + proxybench.StartBare(b, vm+":8080") + "/", Proc: os.Getpid()},
		{Name: "direct", URL: "http://" + vm + ":8080/"},
	}
	targets = proxybench.Selected(targets)
	rounds := proxybench.EnvInt("ALEPHVM_PROXYBENCH_ROUNDS", 3)
	seconds := proxybench.EnvInt("ALEPHVM_PROXYBENCH_SECONDS", 5)
	// What the node spends with no request (its own timers and pollers)
	// is part of its CPU per request below: said here to weigh it.
	idle0, start := proxybench.CPUTime(node.cmd.Process.Pid, false), time.Now()
	time.Sleep(3 * time.Second)
	b.Logf("node idle: %.1f ms of CPU per second", float64((proxybench.CPUTime(node.cmd.Process.Pid, false)-idle0).Microseconds())/1e3/time.Since(start).Seconds())
	for b.Loop() {
		proxybench.Compare(b, targets, rounds, time.Duration(seconds)*time.Second, proxybench.Load(b), tapPackets)
	}
}

// tapPackets is the packets the VMs' taps (one VM here, in the test's
// namespace) sent and received, from /proc/net/dev (/sys/class/net shows
// the namespace sysfs was mounted in).
func tapPackets() uint64 {
	dev, _ := os.ReadFile("/proc/self/net/dev")
	prefix := strings.TrimRight(network.TapName(0), "0")
	var n uint64
	for _, line := range strings.Split(string(dev), "\n") {
		name, counters, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(strings.TrimSpace(name), prefix) {
			continue
		}
		// Received bytes, packets, ... then transmitted bytes, packets.
		f := strings.Fields(counters)
		if len(f) < 10 {
			continue
		}
		rx, _ := strconv.ParseUint(f[1], 10, 64)
		tx, _ := strconv.ParseUint(f[9], 10, 64)
		n += rx + tx
	}
	return n
}
