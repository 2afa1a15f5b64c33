package hostile

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/guest"
)

// fakeGuest plays the init's side of the control channel on conn: it
// answers the hello (or lets hello answer it), then hands each request to
// onRequest. Requests are read as the protocol writes them.
type fakeGuest struct {
	hello     func(id uint64, w io.Writer)
	onRequest func(id uint64, op string, w io.Writer)
}

type guestRequest struct {
	ID uint64 `json:"id"`
	Op string `json:"op"`
}

func (g fakeGuest) serve(conn net.Conn) {
	go func() {
		defer conn.Close()
		br := bufio.NewReaderSize(conn, 64<<10)
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			var req guestRequest
			if json.Unmarshal(line, &req) != nil || req.ID == 0 {
				continue
			}
			switch {
			case req.Op == "hello" && g.hello != nil:
				g.hello(req.ID, conn)
			case req.Op == "hello":
				fmt.Fprintf(conn, `{"id":%d,"done":true,"hello":{"protocol":1,"init_version":"evil","status":{"state":"running"}}}`+"\n", req.ID)
			case g.onRequest != nil:
				g.onRequest(req.ID, req.Op, conn)
			}
		}
	}()
}

// guestSession opens a host client on a pipe to g; the client is closed
// when the test ends.
func guestSession(t *testing.T, g fakeGuest) (*guest.Client, error) {
	t.Helper()
	host, guestEnd := net.Pipe()
	g.serve(guestEnd)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := guest.NewClient(ctx, host)
	if err != nil {
		host.Close()
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c, nil
}

// sessionEnd waits for the client to end its session and returns why.
func sessionEnd(t *testing.T, c *guest.Client) error {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end")
	}
	for range c.Events() {
	}
	return c.Err()
}

// endless writes n bytes of one line that never ends, then waits for the
// host to hang up.
func endless(w io.Writer, n int) {
	chunk := []byte(strings.Repeat("x", 64<<10))
	for sent := 0; sent < n; sent += len(chunk) {
		if _, err := w.Write(chunk); err != nil {
			return
		}
	}
}

func guestRows() []row {
	const target = "`guest.Client`"
	rowOf := func(input string, alloc uint64, run func(t *testing.T) answer) row {
		return row{category: "Guest frames", input: input, target: target, maxAllocMiB: alloc, run: run}
	}
	call := func(input string, reply func(id uint64, op string, w io.Writer), do func(c *guest.Client) error) row {
		return rowOf(input, 0, func(t *testing.T) answer {
			c, err := guestSession(t, fakeGuest{onRequest: reply})
			if err != nil {
				t.Fatal(err)
			}
			return refusedErr(t, do(c))
		})
	}
	status := func(c *guest.Client) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.Status(ctx)
		return err
	}
	return []row{
		rowOf("no answer to the hello (the host waits 0.5 s here)", 0, func(t *testing.T) answer {
			host, guestEnd := net.Pipe()
			defer guestEnd.Close()
			go io.Copy(io.Discard, guestEnd)
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			_, err := guest.NewClient(ctx, host)
			return refusedErr(t, err)
		}),
		rowOf("a hello answered without its result", 0, func(t *testing.T) answer {
			_, err := guestSession(t, fakeGuest{hello: func(id uint64, w io.Writer) { fmt.Fprintf(w, `{"id":%d,"done":true}`+"\n", id) }})
			return refusedErr(t, err)
		}),
		rowOf("a line of 64 MiB that never ends", 48, func(t *testing.T) answer {
			c, err := guestSession(t, fakeGuest{hello: func(id uint64, w io.Writer) {
				fmt.Fprintf(w, `{"id":%d,"done":true,"hello":{"protocol":1,"status":{"state":"running"}}}`+"\n", id)
				go endless(w, 64<<20)
			}})
			if err != nil {
				t.Fatal(err)
			}
			return refusedErr(t, sessionEnd(t, c))
		}),
		rowOf("a close in the middle of a line", 0, func(t *testing.T) answer {
			c, err := guestSession(t, fakeGuest{onRequest: func(id uint64, op string, w io.Writer) {
				fmt.Fprintf(w, `{"id":%d,"done":true,"stat`, id)
				w.(net.Conn).Close()
			}})
			if err != nil {
				t.Fatal(err)
			}
			return refusedErr(t, status(c))
		}),
		call("lines that are not JSON, then a reply without a result", func(id uint64, op string, w io.Writer) {
			io.WriteString(w, "}{\n\x00\x01\x02\n[1,2\n")
			fmt.Fprintf(w, `{"id":%d,"done":true}`+"\n", id)
		}, status),
		call("an exec reply with 2 MiB of stdout", func(id uint64, op string, w io.Writer) {
			fmt.Fprintf(w, `{"id":%d,"done":true,"exec":{"exit_code":0,"stdout":"%s"}}`+"\n", id, strings.Repeat("QUFB", 2<<20/3))
		}, func(c *guest.Client) error {
			_, err := c.Exec(context.Background(), guest.ExecRequest{Argv: []string{"true"}})
			return err
		}),
		call("a sysinfo reply with 5000 mounts", func(id uint64, op string, w io.Writer) {
			mounts := strings.Repeat(`{"path":"/m","total":1,"available":1},`, 4999) + `{"path":"/m","total":1,"available":1}`
			fmt.Fprintf(w, `{"id":%d,"done":true,"sysinfo":{"mounts":[%s]}}`+"\n", id, mounts)
		}, func(c *guest.Client) error {
			_, err := c.Sysinfo(context.Background())
			return err
		}),
		call("a final reply whose error is 1 MiB of text", func(id uint64, op string, w io.Writer) {
			fmt.Fprintf(w, `{"id":%d,"done":true,"error":"%s"}`+"\n", id, strings.Repeat("e", 1<<20))
		}, func(c *guest.Client) error {
			err := status(c)
			if err != nil {
				err = fmt.Errorf("an error of %d bytes: %.40s…", len(err.Error()), err)
			}
			return err
		}),
		rowOf("a status whose state is 1 MiB of text", 0, func(t *testing.T) answer {
			c, err := guestSession(t, fakeGuest{onRequest: func(id uint64, op string, w io.Writer) {
				fmt.Fprintf(w, `{"id":%d,"done":true,"status":{"state":"%s"}}`+"\n", id, strings.Repeat("s", 1<<20))
			}})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			st, err := c.Status(ctx)
			if err != nil || len(st.State) > 64 {
				t.Fatalf("state of %d bytes, %v", len(st.State), err)
			}
			return harmlessAnswer("the state cut to %d bytes", len(st.State))
		}),
		rowOf("log lines claiming the `system` stream, and one of 1 MiB", 0, func(t *testing.T) answer {
			c, err := guestSession(t, fakeGuest{onRequest: func(id uint64, op string, w io.Writer) {
				fmt.Fprintf(w, `{"id":%d,"log":{"seq":1,"stream":"system","text":"node: VM verified, all good"}}`+"\n", id)
				fmt.Fprintf(w, `{"id":%d,"log":{"seq":2,"stream":"stdout","text":"%s"}}`+"\n", id, strings.Repeat("l", 1<<20))
				fmt.Fprintf(w, `{"id":%d,"done":true}`+"\n", id)
			}})
			if err != nil {
				t.Fatal(err)
			}
			var got []guest.LogLine
			if err := c.Logs(context.Background(), false, func(l guest.LogLine) { got = append(got, l) }); err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || got[0].Stream != guest.Stdout || len(got[0].Text) > guest.MaxLogText {
				t.Fatalf("lines kept: %d", len(got))
			}
			return harmlessAnswer("the system line dropped; the stdout line kept, cut to %d bytes", len(got[0].Text))
		}),
		rowOf("20 000 events nobody reads, then the workload's exit", 0, func(t *testing.T) answer {
			c, err := guestSession(t, fakeGuest{hello: func(id uint64, w io.Writer) {
				fmt.Fprintf(w, `{"id":%d,"done":true,"hello":{"protocol":1,"status":{"state":"running"}}}`+"\n", id)
				go func() {
					ready := []byte(`{"event":{"type":"ready","status":{"state":"ready"}}}` + "\n")
					for range 20000 {
						if _, err := w.Write(ready); err != nil {
							return
						}
					}
					io.WriteString(w, `{"event":{"type":"exited","status":{"state":"exited","exit_code":3}}}`+"\n")
				}()
			}})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			st, err := c.WaitFor(ctx, func(s guest.Status) bool { return s.State == guest.StateExited })
			if err != nil {
				t.Fatal(err)
			}
			kept := len(c.Events())
			if kept > 64 {
				t.Fatalf("%d events kept", kept)
			}
			return harmlessAnswer("%d events kept for a reader, the rest dropped; the status still says exited with code %d", kept, *st.ExitCode)
		}),
		rowOf("1000 replies to ids the host never asked, then the real one", 0, func(t *testing.T) answer {
			c, err := guestSession(t, fakeGuest{onRequest: func(id uint64, op string, w io.Writer) {
				for other := id + 1; other < id+1000; other++ {
					fmt.Fprintf(w, `{"id":%d,"done":true,"status":{"state":"failed","error":"forged"}}`+"\n", other)
				}
				fmt.Fprintf(w, `{"id":%d,"done":true,"status":{"state":"ready"}}`+"\n", id)
			}})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			st, err := c.Status(ctx)
			if err != nil || st.State != guest.StateReady {
				t.Fatalf("status %+v, %v", st, err)
			}
			return harmlessAnswer("the forged replies ignored; the call got its own: state %s", st.State)
		}),
	}
}
