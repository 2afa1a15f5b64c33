package testenv

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Cmd runs a command and fails the test if it fails.
func Cmd(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NetNS creates a named network namespace for the test (with lo up) and
// deletes it when the test ends. Names are made unique per process.
func NetNS(t testing.TB, name string) string {
	t.Helper()
	RequireIsolatedRoot(t)
	RequireTools(t, "ip")
	full := fmt.Sprintf("avmt%d-%s", os.Getpid(), name)
	Cmd(t, "ip", "netns", "add", full)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", full).Run() })
	Cmd(t, "ip", "-n", full, "link", "set", "lo", "up")
	return full
}

// Veth joins the test's own namespace to ns with a veth pair: hostName
// (with hostAddr, a prefix such as 10.0.0.1/24) here and peerName (with
// peerAddr) in ns, both up. gateway, when set, becomes ns's default route.
func Veth(t testing.TB, hostName, hostAddr, ns, peerName, peerAddr, gateway string) {
	t.Helper()
	Cmd(t, "ip", "link", "add", hostName, "type", "veth", "peer", "name", peerName, "netns", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", hostName).Run() })
	Cmd(t, "ip", "addr", "add", hostAddr, "dev", hostName)
	Cmd(t, "ip", "link", "set", hostName, "up")
	Cmd(t, "ip", "-n", ns, "addr", "add", peerAddr, "dev", peerName)
	Cmd(t, "ip", "-n", ns, "link", "set", peerName, "up")
	if gateway != "" {
		Cmd(t, "ip", "-n", ns, "route", "add", "default", "via", gateway)
	}
}

// The helper process: tests re-run their own binary inside a namespace
// with `ip netns exec` to listen or dial there. Packages that use it call
// MaybeRunHelper first thing in TestMain.
const helperEnv = "ALEPHVM_TEST_HELPER"

// MaybeRunHelper runs the helper and exits when this process was started
// as one by Listen or Dial.
func MaybeRunHelper() {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	addr := os.Getenv(helperEnv + "_ADDR")
	switch mode {
	case "listen":
		// Answer every connection with the address it came from.
		ln, err := net.Listen(os.Getenv(helperEnv+"_NET"), addr)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println("listening")
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(1)
			}
			fmt.Fprintln(c, c.RemoteAddr())
			c.Close()
		}
	case "send":
		// Send _BYTES bytes and report the seconds it took, for throughput.
		n, _ := strconv.ParseInt(os.Getenv(helperEnv+"_BYTES"), 10, 64)
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		buf := make([]byte, 1<<20)
		start := time.Now()
		for sent := int64(0); sent < n; sent += int64(len(buf)) {
			if _, err := c.Write(buf); err != nil {
				fmt.Println("error:", err)
				os.Exit(1)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c) // the sink closes once it has read everything
		fmt.Println(time.Since(start).Seconds())
		os.Exit(0)
	case "dns", "web":
		run := runDNS
		if mode == "web" {
			run = runWeb
		}
		if err := run(addr); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		os.Exit(0)
	case "dial":
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Print(line)
		os.Exit(0)
	}
	os.Exit(2)
}

// helper runs this test binary as a helper in ns, or in the test's own
// namespace when ns is empty.
func helper(ns, mode, addr string) *exec.Cmd {
	self, _ := os.Executable()
	cmd := exec.Command(self)
	if ns != "" {
		cmd = exec.Command("ip", "netns", "exec", ns, self)
	}
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, helperEnv+"_ADDR="+addr, helperEnv+"_NET=tcp")
	return cmd
}

// Listen serves TCP on addr inside ns (empty: the test's own namespace)
// until the test ends; each connection is answered with its source
// address.
func Listen(t testing.TB, ns, addr string) {
	t.Helper()
	startHelper(t, helper(ns, "listen", addr), "listen on "+addr+" in "+ns)
}

// Send writes n bytes to addr from inside ns (empty: the test's own
// namespace) and returns how long it took, the receiver having read
// everything.
func Send(ns, addr string, n int64) (time.Duration, error) {
	cmd := helper(ns, "send", addr)
	cmd.Env = append(cmd.Env, helperEnv+"_BYTES="+strconv.FormatInt(n, 10))
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("send to %s from %q: %v: %s", addr, ns, err, out)
	}
	secs, err := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
	if err != nil {
		return 0, fmt.Errorf("send to %s: %s", addr, out)
	}
	return time.Duration(secs * float64(time.Second)), nil
}

// Dial connects to addr from inside ns (empty: the test's own namespace)
// and returns the source address the
// listener saw, or an error if no connection could be made within a
// second.
func Dial(ns, addr string) (string, error) {
	out, err := helper(ns, "dial", addr).Output()
	if err != nil {
		return "", fmt.Errorf("dial %s from %s: %v: %s", addr, ns, err, out)
	}
	return strings.TrimSpace(string(out)), nil
}
