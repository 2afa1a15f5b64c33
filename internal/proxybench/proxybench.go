// Package proxybench holds what the benchmarks comparing the node's proxy
// with nginx share: nginx run from a config of its own (the reverse proxy
// an operator would otherwise put in front of a program), load generators
// (wrk, or an in-process HTTP/1.1 client) and the interleaved comparison.
package proxybench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Target is one way to the program. Proc, when set, is the process that
// proxies (with its children if Children: nginx's workers): the CPU time
// it spends per request is reported too.
type Target struct {
	Name, URL string
	Proc      int
	Children  bool
}

// Compare loads each target in turn, rounds times, at 32 and at 200
// connections (see Connections), after a second of warm-up each:
// interleaved (one, two, three, then three, two, one, ...) so that other
// work on the machine weighs on all alike. It logs every round and reports
// the medians, and the first target's rate over each of the others: the
// ratio of the medians, and the median of the ratios round by round
// ("-paired"). When packets is not nil, it also reports how many packets
// packets counts per request: the guest's traffic, which each proxy
// shapes its own way.
func Compare(b *testing.B, targets []Target, rounds int, d time.Duration, load LoadFunc, packets func() uint64) {
	for _, conns := range Connections() {
		rates, cpus, pkts := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
		// A second of each first, not counted: connections opened, pools
		// filled, so that no round pays for them.
		for _, tg := range targets {
			if _, err := load(tg.URL, conns, time.Second); err != nil {
				b.Fatalf("%s at %d connections: %v", tg.Name, conns, err)
			}
		}
		for round := range rounds {
			// Every other round in reverse order, so that no target is
			// always the one that runs after another has loaded the guest.
			order := slices.Clone(targets)
			if round%2 == 1 {
				slices.Reverse(order)
			}
			for _, tg := range order {
				cpu0 := CPUTime(tg.Proc, tg.Children)
				var pkts0 uint64
				if packets != nil {
					pkts0 = packets()
				}
				start := time.Now()
				rate, err := load(tg.URL, conns, d)
				if err != nil {
					b.Fatalf("%s at %d connections: %v", tg.Name, conns, err)
				}
				rates[tg.Name] = append(rates[tg.Name], rate)
				requests := rate * time.Since(start).Seconds()
				perReq := ""
				if tg.Proc != 0 && rate > 0 {
					us := float64((CPUTime(tg.Proc, tg.Children) - cpu0).Microseconds()) / requests
					cpus[tg.Name] = append(cpus[tg.Name], us)
					perReq = fmt.Sprintf(", %.1f µs of CPU per request", us)
				}
				if packets != nil && rate > 0 {
					pp := float64(packets()-pkts0) / requests
					pkts[tg.Name] = append(pkts[tg.Name], pp)
					perReq += fmt.Sprintf(", %.2f packets per request", pp)
				}
				b.Logf("c%d round %d %s: %.0f req/s%s (load %s)", conns, round+1, tg.Name, rate, perReq, LoadAverage())
			}
		}
		c := "c" + strconv.Itoa(conns)
		first := Median(rates[targets[0].Name])
		for _, tg := range targets {
			b.ReportMetric(Median(rates[tg.Name]), "req/s-"+tg.Name+"-"+c)
			if len(cpus[tg.Name]) > 0 {
				b.ReportMetric(Median(cpus[tg.Name]), "cpu-us/req-"+tg.Name+"-"+c)
			}
			if len(pkts[tg.Name]) > 0 {
				b.ReportMetric(Median(pkts[tg.Name]), "packets/req-"+tg.Name+"-"+c)
			}
		}
		for _, tg := range targets[1:] {
			b.ReportMetric(first/Median(rates[tg.Name]), targets[0].Name+"/"+tg.Name+"-"+c)
			// The same ratio taken round by round (the two loads ran
			// seconds apart) and then its median: a guest that slows down
			// or speeds up during the run weighs on it less.
			if paired := roundRatios(rates[targets[0].Name], rates[tg.Name]); len(paired) > 0 {
				b.ReportMetric(Median(paired), targets[0].Name+"/"+tg.Name+"-"+c+"-paired")
				b.ReportMetric(wonShare(paired), targets[0].Name+"/"+tg.Name+"-"+c+"-rounds-won")
				// Where the median ratio lies, with no assumption on how the
				// rounds spread: a range that holds 1 is a tie at this host's
				// precision.
				lo, hi, coverage := MedianInterval(paired)
				b.ReportMetric(lo, targets[0].Name+"/"+tg.Name+"-"+c+"-paired-lo")
				b.ReportMetric(hi, targets[0].Name+"/"+tg.Name+"-"+c+"-paired-hi")
				b.Logf("c%d %s/%s round by round: median %.2f, %.1f %% interval %.2f–%.2f over %d rounds",
					conns, targets[0].Name, tg.Name, Median(paired), 100*coverage, lo, hi, len(paired))
			}
			if paired := roundRatios(cpus[targets[0].Name], cpus[tg.Name]); len(paired) > 0 {
				b.ReportMetric(Median(paired), "cpu-"+targets[0].Name+"/"+tg.Name+"-"+c+"-paired")
			}
		}
	}
}

// roundRatios is first[i]/other[i] for each round where both were
// measured.
func roundRatios(first, other []float64) []float64 {
	var out []float64
	for i, v := range other {
		if i < len(first) && v > 0 {
			out = append(out, first[i]/v)
		}
	}
	return out
}

// wonShare is the share of ratios at 1 or more: of the rounds, those
// where the first target served at least as much as the other.
func wonShare(ratios []float64) float64 {
	won := 0
	for _, r := range ratios {
		if r >= 1 {
			won++
		}
	}
	return float64(won) / float64(len(ratios))
}

// Selected is targets, or only those named in ALEPHVM_PROXYBENCH_ONLY (a
// comma-separated list), to profile them.
func Selected(targets []Target) []Target {
	only := os.Getenv("ALEPHVM_PROXYBENCH_ONLY")
	if only == "" {
		return targets
	}
	names := strings.Split(only, ",")
	return slices.DeleteFunc(targets, func(t Target) bool { return !slices.Contains(names, t.Name) })
}

// EnvInt is the positive integer in the environment variable name, or
// def: how the benchmarks are sized (ALEPHVM_PROXYBENCH_ROUNDS, ...).
func EnvInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// Connections is the numbers of client connections to compare at: 32 and
// 200, or those listed in ALEPHVM_PROXYBENCH_CONNS ("8,32,200").
func Connections() []int {
	var conns []int
	for _, f := range strings.Split(os.Getenv("ALEPHVM_PROXYBENCH_CONNS"), ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			conns = append(conns, n)
		}
	}
	if len(conns) == 0 {
		return []int{32, 200}
	}
	return conns
}

// Load is wrk when it is installed, else the in-process client (which
// shares the CPUs of what it measures: said in the log).
func Load(b testing.TB) LoadFunc {
	if wrk, err := exec.LookPath("wrk"); err == nil {
		return Wrk(wrk)
	}
	b.Log("wrk is not installed (apt-get install wrk): the load comes from an in-process client, which shares the measured CPUs")
	return InProcess
}

// StartNginx runs nginx on loopback, from a config of its own in a
// temporary directory, passing prefix to upstream over kept-alive
// connections, and returns the URL of prefix through it and the pid of
// its master process.
func StartNginx(b testing.TB, nginx, upstream, prefix string) (string, int) {
	b.Helper()
	dir := b.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	conf := NginxConfig(dir, addr, upstream, prefix)
	if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(nginx, "-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", filepath.Join(dir, "error.log"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		b.Fatalf("start nginx: %v", err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	b.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	url := "http://" + addr + prefix
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return url, cmd.Process.Pid
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			b.Fatalf("nginx exited: %v\n%s%s", waitErr, out.String(), log)
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("nginx does not answer at %s: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// NginxConfig is the reverse proxy an operator would put in front of a
// program: a keepalive upstream, HTTP/1.1 to it, the forwarding headers
// the node sets too, no access log (the node keeps none either).
func NginxConfig(dir, listen, upstream, prefix string) string {
	return fmt.Sprintf(`daemon off;
master_process on;
worker_processes auto;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 4096; }
http {
	access_log off;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	keepalive_requests 100000;
	upstream program {
		server %[3]s;
		keepalive 1024;
	}
	server {
		listen %[2]s;
		location %[4]s {
			proxy_pass http://program/;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_set_header Host $host;
			proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
			proxy_set_header X-Forwarded-Proto $scheme;
		}
	}
}
`, dir, listen, upstream, prefix)
}

// LoadFunc drives GET url over conns kept-alive connections for d and
// returns the rate of answers.
type LoadFunc func(url string, conns int, d time.Duration) (float64, error)

var (
	wrkRate         = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkSocketErrors = regexp.MustCompile(`Socket errors: connect [1-9]|read [1-9]|write [1-9]`)
)

// Wrk runs wrk with two threads, as the field measurements did.
func Wrk(wrk string) LoadFunc {
	return func(url string, conns int, d time.Duration) (float64, error) {
		out, err := exec.Command(wrk, "-t2", "-c"+strconv.Itoa(conns), "-d"+strconv.Itoa(int(d.Seconds()))+"s", url).CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("wrk: %v\n%s", err, out)
		}
		// Wrong answers and broken connections fail the run; a request
		// wrk gave up on after its 2 s (an emulated VM flooded by 200
		// connections) is only slow, and the rate says so.
		if bytes.Contains(out, []byte("Non-2xx")) || wrkSocketErrors.Match(out) {
			return 0, fmt.Errorf("wrk saw errors:\n%s", out)
		}
		m := wrkRate.FindSubmatch(out)
		if m == nil {
			return 0, fmt.Errorf("no rate in wrk's output:\n%s", out)
		}
		return strconv.ParseFloat(string(m[1]), 64)
	}
}

// InProcess is a small HTTP/1.1 client: each connection writes a GET
// and reads its answer, again and again.
func InProcess(target string, conns int, d time.Duration) (float64, error) {
	u, err := http.NewRequest("GET", target, nil)
	if err != nil {
		return 0, err
	}
	req := []byte("GET " + u.URL.RequestURI() + " HTTP/1.1\r\nHost: " + u.URL.Host + "\r\n\r\n")
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var done atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", u.URL.Host)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
			br := bufio.NewReader(c)
			for ctx.Err() == nil {
				if _, err := c.Write(req); err != nil {
					break
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					break
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil {
					break
				}
				if resp.StatusCode != http.StatusOK {
					errs <- fmt.Errorf("status %d", resp.StatusCode)
					return
				}
				done.Add(1)
			}
		}()
	}
	start := time.Now()
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

// Median is the middle of xs.
func Median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// MedianInterval is a confidence interval for the median of xs from
// their order statistics (the sign test's): the narrowest [x(k), x(n-k+1)]
// that holds the median with 95 % confidence, or [min, max] when there are
// too few figures for that, and the confidence of the interval returned.
func MedianInterval(xs []float64) (lo, hi, coverage float64) {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return 0, 0, 0
	}
	// below[k] is P(B <= k) for B ~ Binomial(n, 1/2).
	below := make([]float64, n+1)
	p, sum := math.Pow(0.5, float64(n)), 0.0
	for k := 0; k <= n; k++ {
		sum += p
		below[k] = sum
		p = p * float64(n-k) / float64(k+1)
	}
	// [x(k), x(n-k+1)] (1-based) misses the median with probability
	// 2·P(B <= k-1).
	k := 1
	for k+1 <= n-k && 1-2*below[k] >= 0.95 {
		k++
	}
	return s[k-1], s[n-k], 1 - 2*below[k-1]
}

// LoadAverage is the machine's 1-minute load average, noted with each
// figure: other work on the machine weighs on them.
func LoadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Fields(string(b))[0]
}

// CPUTime is the user and system CPU time of process pid, and of its
// children, live or waited for, if children; 0 for pid 0 or a process
// that is gone.
func CPUTime(pid int, children bool) time.Duration {
	if pid == 0 {
		return 0
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// Fields after the command's closing parenthesis: state is the 3rd
	// field, utime the 14th, stime the 15th, cutime and cstime the next.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(stat[i+1:]))
	fields := []int{11, 12}
	if children {
		fields = append(fields, 13, 14)
	}
	var ticks int64
	for _, k := range fields {
		if k < len(f) {
			n, _ := strconv.ParseInt(f[k], 10, 64)
			ticks += n
		}
	}
	total := time.Duration(ticks) * time.Second / clockTicks
	if !children {
		return total
	}
	kids, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(pid) + "/children")
	for _, c := range strings.Fields(string(kids)) {
		if n, err := strconv.Atoi(c); err == nil {
			total += CPUTime(n, true)
		}
	}
	return total
}

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc.
const clockTicks = 100
