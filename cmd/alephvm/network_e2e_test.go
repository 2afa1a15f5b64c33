package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/network"
)

// serveEnv makes the test binary run the node: the network test kills
// that process with SIGKILL.
const serveEnv = "ALEPHVM_TEST_SERVE"

func maybeServe() {
	if os.Getenv(serveEnv) == "" {
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, []string{"serve"}, os.Stdout, os.Stderr, os.Environ())
	stop()
	os.Exit(code)
}

// nodeProcess runs the node as its own process.
type nodeProcess struct {
	cmd  *exec.Cmd
	logs *syncBuffer
}

func startNode(t testing.TB, env []string, port int) *nodeProcess {
	t.Helper()
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = append(append(os.Environ(), env...), serveEnv+"=1")
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// A node left running by a test ends with a SIGTERM, which stops its
	// on-demand programs (a SIGKILL would leave their VMs running), then
	// a SIGKILL if it hangs.
	t.Cleanup(func() {
		if cmd.ProcessState != nil {
			return
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Minute):
			_ = cmd.Process.Kill()
		}
	})
	waitListening(t, port, logs.String)
	return &nodeProcess{cmd: cmd, logs: logs}
}

// vmStatus is one row of /v2/about/executions/list.
type vmStatus struct {
	Networking struct {
		IPv4        string `json:"ipv4_ip"`
		HostIPv4    string `json:"host_ipv4"`
		IPv6        string `json:"ipv6_ip"`
		Tap         string `json:"tap"`
		MappedPorts map[string]struct {
			Host int `json:"host"`
		} `json:"mapped_ports"`
	} `json:"networking"`
	Running bool `json:"running"`
}

func listVMs(t testing.TB, port int) map[string]vmStatus {
	t.Helper()
	resp, body := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/v2/about/executions/list", port))
	if resp != 200 {
		t.Fatalf("list: %d %s", resp, body)
	}
	var out map[string]vmStatus
	if err := json.Unmarshal([]byte(body), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// canConnect asks the VM at host (over SSH, with its own python3) whether
// it can open a TCP connection to addr.
func canConnect(key, host, addr string) bool {
	h, p, _ := net.SplitHostPort(addr)
	out, _ := testenv.SSH(key, host, fmt.Sprintf(
		`python3 -c 'import socket; socket.create_connection(("%s", %s), timeout=3); print("connected")' 2>/dev/null || echo refused`, h, p))
	return strings.HasSuffix(out, "connected")
}

// TestNetworkWithVMs checks the network with booted instances. The test's
// namespace is the node; an "internet" namespace is joined to it by a veth
// pair (the uplink) and plays the outside world and an outside client.
// Two VMs: A with internet and a published port, B without internet.
func TestNetworkWithVMs(t *testing.T) {
	if testing.Short() {
		t.Skip("boots two Debian VMs under emulation: minutes")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img", "nft", "mkfs.ext4", "ip")
	base := testassets.BaseImage(t)
	key, pub := testenv.SSHKey(t)
	keyFile := filepath.Join(t.TempDir(), "key.pub")
	os.WriteFile(keyFile, []byte(pub+"\n"), 0o600)

	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	internet := testenv.NetNS(t, "inet")
	testenv.Veth(t, "up0", "10.99.0.1/24", internet, "eth0", "10.99.0.2/24", "")
	// The internet is beyond the node's default route; 10.99.0.0/24 is the
	// operator's network, which VMs may not reach, and so is the cloud's
	// metadata service.
	testenv.Cmd(t, "ip", "-n", internet, "addr", "add", "203.0.113.10/32", "dev", "lo")
	testenv.Cmd(t, "ip", "-n", internet, "addr", "add", "169.254.169.254/32", "dev", "lo")
	testenv.Cmd(t, "ip", "route", "add", "default", "via", "10.99.0.2")
	testenv.Listen(t, internet, ":80")
	testenv.Listen(t, "", "0.0.0.0:9999") // a service of the node's host

	dir, port, env := nodeEnv(t, "up0", "10.99.0.2")
	// A program runs beside the instances, for the metrics and the status
	// page.
	env = append(env, "ALEPH_VM_ASSETS_DIR="+testassets.ProgramAssets(t), "ALEPH_VM_INIT_TIMEOUT=180",
		"ALEPH_VM_IPV6_ADDRESS_POOL=fd00:a1e:9::/64")
	// The node boots bare ext4 images with the base image's kernel, from
	// its cache: give it the one built for the tests.
	os.MkdirAll(filepath.Join(dir, "cache"), 0o755)
	if err := os.Symlink(filepath.Dir(base.Disk), filepath.Join(dir, "cache", "base-image")); err != nil {
		t.Fatal(err)
	}
	node := startNode(t, env, port)
	defer func() {
		if node != nil {
			node.cmd.Process.Signal(syscall.SIGTERM)
			node.cmd.Wait()
		}
	}()

	create := func(args ...string) string {
		code, out, errOut := runCLI(t, env, append([]string{"instance", "create", "--image", base.Ext4, "--size", "2048", "--ssh-key", keyFile}, args...)...)
		if code != 0 {
			t.Fatalf("create: %s %s", out, errOut)
		}
		return strings.TrimSpace(out)
	}
	a := create("--internet", "--publish", "5001")
	b := create()
	for _, ref := range []string{a, b} {
		if code, out, errOut := runCLI(t, env, "vm", "start", ref); code != 0 {
			t.Fatalf("start: %s %s\n%s", out, errOut, node.logs.String())
		}
	}
	vms := listVMs(t, port)
	ipA, ipB := vms[a].Networking.IPv4, vms[b].Networking.IPv4
	testenv.WaitSSH(t, key, ipA, 6*time.Minute)
	testenv.WaitSSH(t, key, ipB, 6*time.Minute)

	checks := func(when string) {
		t.Helper()
		if !canConnect(key, ipA, "203.0.113.10:80") {
			t.Errorf("%s: A (internet on) cannot reach the outside", when)
		}
		if canConnect(key, ipB, "203.0.113.10:80") {
			t.Errorf("%s: B (internet off) reaches the outside", when)
		}
		if canConnect(key, ipA, "10.99.0.2:80") || canConnect(key, ipA, "169.254.169.254:80") {
			t.Errorf("%s: A reaches the operator's network or the metadata service", when)
		}
		if canConnect(key, ipA, ipB+":22") || canConnect(key, ipB, ipA+":22") {
			t.Errorf("%s: VMs reach each other", when)
		}
		if canConnect(key, ipA, vms[a].Networking.HostIPv4+":9999") || canConnect(key, ipA, "10.99.0.1:9999") {
			t.Errorf("%s: a VM reaches a service of the host", when)
		}
		sshPort := vms[a].Networking.MappedPorts["22"].Host
		banner, err := testenv.Dial(internet, fmt.Sprintf("10.99.0.1:%d", sshPort))
		if err != nil || !strings.HasPrefix(banner, "SSH-2.0") {
			t.Errorf("%s: port forward to A's SSH from outside: %q %v", when, banner, err)
		}
	}
	checks("first start")

	// IPv6: each VM has its own /124 of the pool, reached from the host;
	// the VMs do not reach each other over it.
	v6A, v6B := vms[a].Networking.IPv6, vms[b].Networking.IPv6
	if !strings.HasPrefix(v6A, "fd00:a1e:9:0:3:") || !strings.HasPrefix(v6B, "fd00:a1e:9:0:3:") {
		t.Fatalf("IPv6 addresses: %q %q", v6A, v6B)
	}
	for _, ip := range []string{v6A, v6B} {
		var banner string
		var err error
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
			if banner, err = testenv.Dial("", net.JoinHostPort(ip, "22")); err == nil {
				break
			}
		}
		if !strings.HasPrefix(banner, "SSH-2.0") {
			t.Errorf("the host does not reach %s over IPv6: %q %v", ip, banner, err)
		}
	}
	if canConnect(key, ipA, net.JoinHostPort(v6B, "22")) || canConnect(key, ipB, net.JoinHostPort(v6A, "22")) {
		t.Errorf("VMs reach each other over IPv6")
	}
	prog := createGoHello(t, env, dir)
	if status, body := httpGet(t, programURL(port, prog, "/")); status != 200 {
		t.Fatalf("program: %d %q\n%s", status, body, node.logs.String())
	}
	before := scrapeNode(t, port)

	// Throughput into A: through the port forward from outside, and to its
	// own address from the node, each a sink of python3 in the VM.
	sink := `nohup python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", 5001)); s.listen(4)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20): pass
    c.close()
' >/dev/null 2>&1 &`
	if out, err := testenv.SSH(key, ipA, sink); err != nil {
		t.Fatalf("sink: %v %s", err, out)
	}
	// python3 starts slowly on a starved guest: wait for its socket.
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		if _, err := testenv.Send("", ipA+":5001", 1024); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the sink never listened: %v", err)
		}
	}
	// From the node itself the two paths differ only by the forward's DNAT;
	// from outside the forward also crosses the uplink's veth pair. Under
	// emulation the guest's CPU sets the pace and varies: the paths take
	// turns, after a warm-up, and each keeps its best of three.
	const size = 64 << 20
	fwd := fmt.Sprintf("10.99.0.1:%d", vms[a].Networking.MappedPorts["5001"].Host)
	testenv.Send("", ipA+":5001", size/4)
	best := map[string]time.Duration{}
	for range 3 {
		for _, p := range []struct{ name, ns, addr string }{{"direct", "", ipA + ":5001"}, {"forward", "", fwd}, {"outside", internet, fwd}} {
			d, err := testenv.Send(p.ns, p.addr, size)
			if err != nil {
				t.Fatalf("throughput %s: %v", p.name, err)
			}
			if best[p.name] == 0 || d < best[p.name] {
				best[p.name] = d
			}
		}
	}
	for range 20 {
		if status, body := httpGet(t, programURL(port, prog, "/")); status != 200 {
			t.Fatalf("program: %d %q", status, body)
		}
	}
	checkMetrics(t, before, scrapeNode(t, port), []observedVM{
		{ref: a, typ: "instance", moved: []string{"alephvm_vm_cpu_seconds_total", "alephvm_vm_network_receive_bytes_total", "alephvm_vm_network_receive_packets_total", "alephvm_vm_uptime_seconds"}},
		{ref: b, typ: "instance", moved: []string{"alephvm_vm_uptime_seconds"}},
		{ref: prog, typ: "program", moved: []string{"alephvm_vm_cpu_seconds_total", "alephvm_vm_network_receive_bytes_total", "alephvm_vm_network_transmit_bytes_total", "alephvm_vm_uptime_seconds"}},
	})
	checkStatusPage(t, port, []string{a, b, prog}, "status-page.png")
	mbps := func(d time.Duration) float64 { return float64(size) / d.Seconds() / 1e6 }
	t.Logf("TCP into a VM under TCG: %.1f MB/s to its address, %.1f MB/s through the port forward: ratio %.2f; %.1f MB/s through it from outside",
		mbps(best["direct"]), mbps(best["forward"]), best["direct"].Seconds()/best["forward"].Seconds(), mbps(best["outside"]))

	// The node is killed: the VMs run on; a new node finds them with their
	// addresses and forwards.
	tapA := vms[a].Networking.Tap
	node.cmd.Process.Kill()
	node.cmd.Wait()
	node = startNode(t, env, port)
	after := listVMs(t, port)
	if after[a].Networking.IPv4 != ipA || after[b].Networking.IPv4 != ipB || !after[a].Running || !after[b].Running ||
		after[a].Networking.MappedPorts["22"].Host != vms[a].Networking.MappedPorts["22"].Host {
		t.Fatalf("after kill -9 and restart: %+v, before: %+v\n%s", after, vms, node.logs.String())
	}
	if out, err := testenv.SSH(key, ipA, "uptime -s"); err != nil {
		t.Errorf("A unreachable after the restart: %v %s", err, out)
	}
	checks("after kill -9 and restart")

	for _, ref := range []string{a, b} {
		if code, out, errOut := runCLI(t, env, "vm", "erase", ref); code != 0 {
			t.Errorf("erase: %s %s", out, errOut)
		}
	}
	taps, err := network.Taps()
	if err != nil || len(taps) != 0 {
		t.Errorf("taps left after the VMs stopped: %v %v (had %s)", taps, err, tapA)
	}
	if ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", network.TableName); strings.Contains(ruleset, "dnat") || regexp.MustCompile(`"avm[0-9]`).MatchString(ruleset) {
		t.Errorf("rules left after the VMs stopped:\n%s", ruleset)
	}
}
