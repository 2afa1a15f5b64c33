package api

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/proxybench"
	"github.com/alephvm/alephvm/pool"
)

// BenchmarkProxyVsNginx measures, in one run, the rate of small requests
// through the node's proxy, through nginx with a keepalive upstream (the
// proxy an operator would otherwise put in front), through a bare Go proxy
// of the fast path's design (proxybench.StartBare: what the node adds shows
// against it) and straight to the program, which runs in a process of its
// own, at 32 and at 200 concurrent connections. The rounds are interleaved
// so that other work on the machine weighs on all alike; the medians are
// reported, with the node's rate over each other's.
//
// Load comes from wrk (-t2) when it is installed, else from an in-process
// HTTP/1.1 client. Run it with -benchtime 1x; ALEPHVM_PROXYBENCH_ROUNDS
// (default 3) and ALEPHVM_PROXYBENCH_SECONDS (default 2) size it;
// ALEPHVM_PROXYBENCH_ONLY=node measures the node alone, to profile it.
func BenchmarkProxyVsNginx(b *testing.B) {
	nginx, err := exec.LookPath("nginx")
	if err != nil {
		b.Skip("nginx is not installed (apt-get install nginx-light): the comparison needs it")
	}
	rounds := proxybench.EnvInt("ALEPHVM_PROXYBENCH_ROUNDS", 3)
	duration := time.Duration(proxybench.EnvInt("ALEPHVM_PROXYBENCH_SECONDS", 2)) * time.Second
	load := proxybench.Load(b)

	// The program runs in a process of its own, so that the node's CPU
	// time is its own.
	direct := startProgramProcess(b) + "/"
	u, _ := url.Parse(direct)
	l := &launcher{remote: u}
	srv := newTestAPI(b, l)
	node := srv.URL + "/vm/" + string(ref) + "/"
	if resp, err := http.Get(node); err != nil { // boots the stand-in program
		b.Fatal(err)
	} else {
		resp.Body.Close()
	}
	viaNginx, nginxPID := proxybench.StartNginx(b, nginx, strings.TrimSuffix(strings.TrimPrefix(direct, "http://"), "/"), "/vm/"+string(ref)+"/")
	http.DefaultClient.CloseIdleConnections()

	bare := "http://" + proxybench.StartBare(b, u.Host) + "/"
	targets := []proxybench.Target{{Name: "node", URL: node, Proc: os.Getpid()}, {Name: "nginx", URL: viaNginx, Proc: nginxPID, Children: true},
		{Name: "bare", URL: bare, Proc: os.Getpid()}, {Name: "direct", URL: direct}}
	targets = proxybench.Selected(targets)
	for b.Loop() {
		proxybench.Compare(b, targets, rounds, duration, load, nil)
	}
}

// smallProgram answers every request with a few bytes, as the small
// binary program of the field measurements does.
func smallProgram() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello from a small program\n")
	})
}

// programAddrEnv tells the test binary to be the benchmark's program.
const programAddrEnv = "ALEPHVM_PROXYBENCH_PROGRAM"

// startProgramProcess runs smallProgram in a process of its own (this
// test binary, see TestMain) and returns its URL.
func startProgramProcess(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), programAddrEnv+"="+addr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		resp, err := http.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
			return "http://" + addr
		}
		if time.Now().After(deadline) {
			b.Fatalf("the program does not answer: %v", err)
		}
	}
}

// remoteProgram is a program already running at an address.
type remoteProgram struct {
	u    *url.URL
	done chan struct{}
	once sync.Once
}

func (p *remoteProgram) Target() *url.URL      { return p.u }
func (p *remoteProgram) Done() <-chan struct{} { return p.done }
func (p *remoteProgram) Networking() pool.Networking {
	return pool.Networking{IPv4Network: "127.0.0.0/8", IPv4: "127.0.0.1", HostIPv4: "127.0.0.1"}
}
func (p *remoteProgram) Stop(context.Context) error { p.once.Do(func() { close(p.done) }); return nil }
