package api

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// newLimitedAPI serves the API as serve does: its own http.Server and
// listener, with limits.
func newLimitedAPI(t *testing.T, opts Options, l *launcher) *httptest.Server {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if l == nil {
		l = &launcher{handler: echoHandler()}
	}
	if l.memory == 0 {
		l.memory, l.timeout = 128, 5*time.Second
	}
	p := pool.New(pool.Options{Launcher: l, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
	opts.Programs, opts.Auth, opts.Version, opts.Log = p, tokenAuth{}, "test", log
	s := New(opts)
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = s.HTTPServer()
	srv.Listener = s.Listener(srv.Listener)
	srv.Start()
	t.Cleanup(func() { srv.Close(); p.Shutdown(context.Background()) })
	return srv
}

// slowLogs sends a line, waits past every timeout, sends another and ends.
type slowLogs struct{ pause time.Duration }

func (s slowLogs) Follow(ctx context.Context, _ message.ItemHash, fn func(LogLine) error) (bool, bool, error) {
	if err := fn(LogLine{Stream: "stdout", Text: "first"}); err != nil {
		return true, false, err
	}
	select {
	case <-ctx.Done():
		return true, false, ctx.Err()
	case <-time.After(s.pause):
	}
	return true, true, fn(LogLine{Stream: "stdout", Text: "second"})
}

// TestStreamsOutliveTheTimeouts: the read and write timeouts of the
// server do not cut a logs websocket or a program's streamed answer.
func TestStreamsOutliveTheTimeouts(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		time.Sleep(600 * time.Millisecond)
		io.WriteString(w, "second\n")
		w.(http.Flusher).Flush()
		// The end of the stream, past the write timeout again.
		time.Sleep(600 * time.Millisecond)
	})
	limits := Limits{ReadHeaderTimeout: time.Second, ReadTimeout: 200 * time.Millisecond, WriteTimeout: 200 * time.Millisecond, IdleTimeout: time.Second}
	srv := newLimitedAPI(t, Options{Logs: slowLogs{600 * time.Millisecond}, Limits: limits}, &launcher{handler: mux})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := dialLogs(ctx, srv, ref, "good", "")
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	got := readAll(ctx, c)
	if strings.Join(got, "|") != "stdout: first|stdout: second|system: VM is not running, past logs sent" {
		t.Errorf("logs websocket: %q", got)
	}

	resp, body := get(t, srv.URL+"/vm/"+string(ref)+"/slow", "")
	if resp.StatusCode != 200 || body != "first\nsecond\n" {
		t.Errorf("streamed program answer: %d %q", resp.StatusCode, body)
	}
}

// hugeLogs writes past lines until the client stops reading, and says
// when it gave up.
type hugeLogs struct{ gaveUp chan error }

func (h hugeLogs) Follow(ctx context.Context, _ message.ItemHash, fn func(LogLine) error) (bool, bool, error) {
	line := LogLine{Stream: "stdout", Text: strings.Repeat("x", 16<<10)}
	for range 1 << 14 { // 256 MiB
		if err := fn(line); err != nil {
			h.gaveUp <- err
			return true, false, err
		}
	}
	h.gaveUp <- nil
	return true, true, nil
}

// rawConn opens a TCP connection to srv.
func rawConn(t *testing.T, srv *httptest.Server) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// closedByServer reports whether the server closed conn within d.
func closedByServer(conn net.Conn, d time.Duration) bool {
	conn.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, conn)
	return !errors.Is(err, os.ErrDeadlineExceeded)
}

// TestSlowClientsAreCut: a client that sends its body too slowly, one that
// does not read its answer, and one that keeps an idle connection are cut.
func TestSlowClientsAreCut(t *testing.T) {
	limits := Limits{ReadHeaderTimeout: time.Second, ReadTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond, IdleTimeout: 300 * time.Millisecond}
	logs := hugeLogs{gaveUp: make(chan error, 1)}
	srv := newLimitedAPI(t, Options{Logs: logs, Limits: limits}, nil)

	t.Run("body never sent", func(t *testing.T) {
		conn := rawConn(t, srv)
		io.WriteString(conn, "POST /control/machine/"+string(ref)+"/stop HTTP/1.1\r\nHost: node\r\nX-Auth-Signature: good\r\nContent-Length: 100\r\n\r\n")
		if !closedByServer(conn, 5*time.Second) {
			t.Error("the connection stays open without the body it announced")
		}
	})

	t.Run("answer never read", func(t *testing.T) {
		conn := rawConn(t, srv)
		io.WriteString(conn, "GET /control/machine/"+string(ref)+"/logs HTTP/1.1\r\nHost: node\r\nX-Auth-Signature: good\r\n\r\n")
		select {
		case err := <-logs.gaveUp:
			if err == nil {
				t.Error("256 MiB written to a client that reads nothing")
			}
		case <-time.After(10 * time.Second):
			t.Error("the answer is still being written to a client that reads nothing")
		}
	})

	t.Run("idle connection", func(t *testing.T) {
		conn := rawConn(t, srv)
		io.WriteString(conn, "GET /about/executions/list HTTP/1.1\r\nHost: node\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if !closedByServer(conn, 5*time.Second) {
			t.Error("an idle connection stays open")
		}
	})
}

// patternHandler answers size bytes of a pattern (size < 0: without end,
// in chunks) and says when its writes failed.
func patternHandler(size int64, gaveUp chan<- error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if size >= 0 {
			w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		}
		buf := bytes.Repeat([]byte("0123456789abcdef"), 2<<10)
		for sent := int64(0); size < 0 || sent < size; sent += int64(len(buf)) {
			part := buf
			if size >= 0 {
				part = buf[:min(int64(len(buf)), size-sent)]
			}
			if _, err := w.Write(part); err != nil {
				gaveUp <- err
				return
			}
		}
		gaveUp <- nil
	}
}

// TestStalledProgramReaderIsCut: a client that stops reading a program's
// streamed answer is cut once a write waits past the write timeout, and
// the program's writes then fail (its lease ends).
func TestStalledProgramReaderIsCut(t *testing.T) {
	gaveUp := make(chan error, 1)
	limits := Limits{ReadHeaderTimeout: time.Second, ReadTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond, IdleTimeout: time.Second}
	srv := newLimitedAPI(t, Options{Limits: limits}, &launcher{handler: patternHandler(-1, gaveUp)})
	conn := rawConn(t, srv)
	io.WriteString(conn, "GET /vm/"+string(ref)+"/huge HTTP/1.1\r\nHost: node\r\n\r\n")
	select {
	case err := <-gaveUp:
		if err == nil {
			t.Error("an endless answer ended")
		}
	case <-time.After(20 * time.Second):
		t.Error("the program still writes to a client that reads nothing")
	}
}

// TestSlowProgramReaderIsNotCut: a client that reads a large answer
// steadily, 256 KiB/s, each 128 KiB well within the write timeout, reads
// it whole, although a third of the connection's send queue (4 MiB)
// takes longer than the timeout to drain (TCP_NOTSENT_LOWAT).
func TestSlowProgramReaderIsNotCut(t *testing.T) {
	if testing.Short() {
		t.Skip("reads 3 MiB at 256 KiB/s")
	}
	const size = 3 << 20
	gaveUp := make(chan error, 1)
	limits := Limits{ReadHeaderTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: 1500 * time.Millisecond, IdleTimeout: time.Second}
	srv := newLimitedAPI(t, Options{Limits: limits}, &launcher{handler: patternHandler(size, gaveUp)})
	resp, err := http.Get(srv.URL + "/vm/" + string(ref) + "/large")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 64<<10)
	var read int
	start := time.Now()
	for read < size {
		n, err := io.ReadFull(resp.Body, buf[:min(len(buf), size-read)])
		read += n
		if err != nil {
			t.Fatalf("cut after %d of %d bytes, %s: %v", read, size, time.Since(start), err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err := <-gaveUp; err != nil {
		t.Errorf("the program's writes failed: %v", err)
	}
}

// TestConnectionLimit: past MaxConnections, a new connection waits until
// one closes.
func TestConnectionLimit(t *testing.T) {
	srv := newLimitedAPI(t, Options{Limits: Limits{MaxConnections: 1, IdleTimeout: time.Minute}}, nil)
	request := func(conn net.Conn) chan error {
		done := make(chan error, 1)
		go func() {
			io.WriteString(conn, "GET /about/executions/list HTTP/1.1\r\nHost: node\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err == nil {
				resp.Body.Close()
			}
			done <- err
		}()
		return done
	}
	first := rawConn(t, srv)
	if err := <-request(first); err != nil {
		t.Fatal(err)
	}
	second := rawConn(t, srv)
	answered := request(second)
	select {
	case err := <-answered:
		t.Fatalf("a second connection was served while the first is open: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	first.Close()
	select {
	case err := <-answered:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the second connection was not served once the first closed")
	}
}
