package api

import (
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/proxybench"
)

// BenchmarkProxyVsNginx measures, in one run, the rate of small requests
// through the node's proxy, through nginx with a keepalive upstream (the
// proxy an operator would otherwise put in front) and straight to the
// program, all three to the same in-process program, at 32 and at 200
// concurrent connections. The rounds are interleaved (node, nginx, direct,
// node, ...) so that other work on the machine weighs on all three alike;
// the medians are reported, with node/nginx and node/direct.
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
	rounds := envInt("ALEPHVM_PROXYBENCH_ROUNDS", 3)
	duration := time.Duration(envInt("ALEPHVM_PROXYBENCH_SECONDS", 2)) * time.Second
	load := proxybench.Load(b)

	program := smallProgram()
	l := &launcher{handler: program}
	srv := newTestAPI(b, l)
	node := srv.URL + "/vm/" + string(ref) + "/"
	if resp, err := http.Get(node); err != nil { // boots the stand-in program
		b.Fatal(err)
	} else {
		resp.Body.Close()
	}
	l.mu.Lock()
	direct := l.last.srv.URL + "/"
	l.mu.Unlock()
	viaNginx := proxybench.StartNginx(b, nginx, strings.TrimSuffix(strings.TrimPrefix(direct, "http://"), "/"), "/vm/"+string(ref)+"/")
	http.DefaultClient.CloseIdleConnections()

	targets := []proxybench.Target{{Name: "node", URL: node}, {Name: "nginx", URL: viaNginx}, {Name: "direct", URL: direct}}
	if only := os.Getenv("ALEPHVM_PROXYBENCH_ONLY"); only != "" {
		// One target alone, to profile it (-cpuprofile).
		targets = slices.DeleteFunc(targets, func(t proxybench.Target) bool { return t.Name != only })
	}
	for b.Loop() {
		proxybench.Compare(b, targets, rounds, duration, load)
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

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}
