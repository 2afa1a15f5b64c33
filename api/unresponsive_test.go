package api

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// blackhole returns the address of a loopback listener whose queue of
// connections is full and never emptied: the kernel drops the SYNs of any
// further connection, which times out, as one to a guest whose network
// has stopped does.
func blackhole(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*unix.SockaddrInet4).Port))
	// A backlog of 0 queues one connection: this one fills the queue.
	filler, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { filler.Close() })
	if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil || !timedOut(err) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("a connection to the full listener did not time out: %v", err)
	}
	return addr
}

// tappedProgram is a program already running, on a tap of its own.
type tappedProgram struct {
	*remoteProgram
	tap string
}

func (p *tappedProgram) Networking() pool.Networking {
	n := p.remoteProgram.Networking()
	n.Tap = p.tap
	return n
}

// silentLauncher boots first a program whose network has stopped, then
// programs that answer.
type silentLauncher struct {
	dead  *tappedProgram
	mu    sync.Mutex
	boots int
}

func (l *silentLauncher) Plan(_ context.Context, r message.ItemHash) (*pool.Plan, error) {
	return &pool.Plan{Ref: r, Revision: "1", VCPUs: 1, MemoryMiB: 128, Timeout: 5 * time.Second, CodeRef: ref}, nil
}

func (l *silentLauncher) Boot(context.Context, *pool.Plan) (pool.Program, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.boots++
	if l.boots == 1 {
		return l.dead, nil
	}
	return &vm{srv: httptest.NewServer(echoHandler()), done: make(chan struct{})}, nil
}

func (l *silentLauncher) booted() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.boots
}

// A program VM that takes no connection and sends nothing is stopped, and
// the next request boots another: a guest's network that stopped for good
// would otherwise fail every request until the program went idle. One
// that takes no connection but still sends packets is busy, and runs on.
func TestUnresponsiveVMIsReplaced(t *testing.T) {
	for _, path := range []string{"fast path", "net/http"} {
		for _, tc := range []struct {
			name   string
			sends  bool // the guest sends packets
			reboot bool
		}{{"silent guest", false, true}, {"busy guest", true, false}} {
			t.Run(path+"/"+tc.name, func(t *testing.T) {
				u, _ := url.Parse("http://" + blackhole(t) + "/")
				l := &silentLauncher{dead: &tappedProgram{&remoteProgram{u: u, done: make(chan struct{})}, "avm7"}}
				var packets atomic.Uint64
				count := func(tap string) (uint64, error) {
					if tap != "avm7" {
						t.Errorf("packets counted on %q, not the VM's tap", tap)
					}
					if tc.sends {
						return packets.Add(1), nil
					}
					return packets.Load(), nil
				}
				srv := newSilentAPI(t, l, path == "fast path", count)
				if resp, body := get(t, srv.URL+"/vm/"+string(ref)+"/", ""); resp.StatusCode != 502 {
					t.Fatalf("a VM that takes no connection: %d %s", resp.StatusCode, body)
				}
				if !tc.reboot {
					time.Sleep(time.Second) // the look at it is over
					select {
					case <-l.dead.Done():
						t.Fatal("a guest that sends packets was stopped")
					default:
					}
					return
				}
				select {
				case <-l.dead.Done():
				case <-time.After(5 * time.Second):
					t.Fatal("a silent VM was not stopped")
				}
				resp, body := get(t, srv.URL+"/vm/"+string(ref)+"/", "")
				if resp.StatusCode != 200 || l.booted() != 2 {
					t.Errorf("after the silent VM stopped: %d %q, %d boots", resp.StatusCode, body, l.booted())
				}
			})
		}
	}
}

// newSilentAPI serves the API (on the fast path's listener, or net/http
// alone) with connections to VMs that time out after 300 ms, and a look
// at a VM that lasts as long, counting its guest's packets with count.
func newSilentAPI(t *testing.T, l pool.Launcher, fast bool, count func(string) (uint64, error)) *httptest.Server {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
	s := New(Options{Programs: p, Auth: tokenAuth{}, Domain: "node.example", Version: "test", Log: log})
	c := s.proxy.conns
	c.dialTimeout, c.probeTimeout, c.guestPackets = 300*time.Millisecond, 300*time.Millisecond, count
	var srv *httptest.Server
	if fast {
		srv = httptest.NewUnstartedServer(nil)
		srv.Config = s.HTTPServer()
		srv.Listener = s.Listener(srv.Listener)
		srv.Start()
	} else {
		srv = httptest.NewServer(s)
	}
	t.Cleanup(func() { srv.Close(); p.Shutdown(context.Background()) })
	return srv
}
