package hostile

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/alephvm/alephvm/message"
)

// wsAnswer reads what the node sends on c until it closes it: its frames,
// then how it closed.
func wsAnswer(t *testing.T, c *websocket.Conn) answer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var parts []string
	failed := false
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			status := websocket.CloseStatus(err)
			switch {
			case status == -1:
				t.Errorf("the node did not close the websocket: %v", err)
				parts = append(parts, "NOT CLOSED: "+err.Error())
			case status != websocket.StatusNormalClosure:
				failed = true
				parts = append(parts, fmt.Sprintf("closed %d %s", int(status), closeText(err)))
			default:
				parts = append(parts, "closed 1000")
			}
			break
		}
		if strings.Contains(string(data), `"status":"failed"`) {
			failed = true
		}
		parts = append(parts, strings.TrimSpace(string(data)))
	}
	if !failed {
		t.Errorf("neither a failure frame nor a failure close")
	}
	return answer{kind: refused, text: strings.Join(parts, "; then ")}
}

func closeText(err error) string {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return ce.Reason
	}
	return err.Error()
}

func wsURL(r *rig, path string) string { return "ws" + strings.TrimPrefix(r.url, "http") + path }

// streamLogs opens the owner's logs websocket of ref and sends first as
// its first frame.
func streamLogs(t *testing.T, r *rig, ref message.ItemHash, first []byte) answer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, wsURL(r, "/control/machine/"+string(ref)+"/stream_logs"), &websocket.DialOptions{HTTPClient: r.client})
	if err != nil {
		if resp != nil {
			return httpAnswer(t, resp)
		}
		t.Fatal(err)
	}
	defer c.CloseNow()
	if err := c.Write(ctx, websocket.MessageText, first); err != nil {
		return answer{kind: refused, text: "closed before the first frame was taken: " + closeText(err)}
	}
	return wsAnswer(t, c)
}

func websocketRows() []row {
	const target = "`api.Server` with `auth.Owner`: `stream_logs`"
	stream := func(input string, first func(t *testing.T, r *rig) []byte) row {
		return apiRow("Websocket frames", input, target, func(t *testing.T, r *rig) answer {
			return streamLogs(t, r, ownedRef, first(t, r))
		})
	}
	fixed := func(b string) func(*testing.T, *rig) []byte {
		return func(*testing.T, *rig) []byte { return []byte(b) }
	}
	logs := func(input string, dial func(t *testing.T, r *rig) answer) row {
		return apiRow("Websocket frames", input, "`api.Server`: `logs` websocket (operator's token)", dial)
	}
	return []row{
		stream("a first frame that is not JSON", fixed("hello")),
		stream("a first frame without `auth`", fixed(`{"hello": "node"}`)),
		stream("a first frame of 1 MiB", fixed(`{"auth":"`+strings.Repeat("x", 1<<20)+`"}`)),
		stream("a first frame whose `X-SignedPubKey` is a string", fixed(`{"auth":{"X-SignedPubKey":"x","X-SignedOperation":"y"}}`)),
		stream("a first frame of binary garbage", fixed("\x00\xff\xfe\x01")),
		stream("a first frame signed by a wallet that does not own the VM", func(t *testing.T, r *rig) []byte {
			return r.sdk(stranger).AuthFrame(string(ownedRef))
		}),
		stream("a first frame signed for another VM's logs", func(t *testing.T, r *rig) []byte {
			return r.sdk(owner).AuthFrame(string(strangerRef))
		}),
		apiRow("Websocket frames", "`stream_logs` of a VM the node does not host", target, func(t *testing.T, r *rig) answer {
			return streamLogs(t, r, strangerRef, []byte("{}"))
		}),
		logs("a `logs` websocket from a page of `https://evil.example`", func(t *testing.T, r *rig) answer {
			h := tokenHeader()
			h.Set("Origin", "https://evil.example")
			return dialLogs(t, r, h)
		}),
		logs("a third `logs` websocket of one VM (`LOGS_MAX_FOLLOWERS_PER_VM` 2 here)", func(t *testing.T, r *rig) answer {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			for range 2 {
				c, _, err := websocket.Dial(ctx, wsURL(r, "/control/machine/"+string(ownedRef)+"/logs"), &websocket.DialOptions{HTTPClient: r.client, HTTPHeader: tokenHeader()})
				if err != nil {
					t.Fatal(err)
				}
				defer c.CloseNow()
				// The follower is counted once its past lines came.
				for range 2 {
					if _, _, err := c.Read(ctx); err != nil {
						t.Fatal(err)
					}
				}
			}
			return dialLogs(t, r, tokenHeader())
		}),
		logs("a text frame `hello` from a `logs` follower, after its past lines", func(t *testing.T, r *rig) answer {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, _, err := websocket.Dial(ctx, wsURL(r, "/control/machine/"+string(ownedRef)+"/logs"), &websocket.DialOptions{HTTPClient: r.client, HTTPHeader: tokenHeader()})
			if err != nil {
				t.Fatal(err)
			}
			defer c.CloseNow()
			readPast(t, ctx, c)
			c.Write(ctx, websocket.MessageText, []byte("hello"))
			return wsAnswer(t, c)
		}),
		logs("a 1 MiB frame from a `logs` follower, after its past lines", func(t *testing.T, r *rig) answer {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, _, err := websocket.Dial(ctx, wsURL(r, "/control/machine/"+string(ownedRef)+"/logs"), &websocket.DialOptions{HTTPClient: r.client, HTTPHeader: tokenHeader()})
			if err != nil {
				t.Fatal(err)
			}
			defer c.CloseNow()
			readPast(t, ctx, c)
			c.Write(ctx, websocket.MessageText, []byte(strings.Repeat("x", 1<<20)))
			return wsAnswer(t, c)
		}),
		row{category: "Websocket frames", input: "a `logs` follower that stops reading (`HTTP_WRITE_TIMEOUT` 0.5 s here)", target: "`api.Server`: `logs` websocket (operator's token)",
			run: func(t *testing.T) answer {
				flood := &floodLogs{}
				r := newRig(t, rigOptions{logs: flood})
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				c, _, err := websocket.Dial(ctx, wsURL(r, "/control/machine/"+string(ownedRef)+"/logs"), &websocket.DialOptions{HTTPClient: r.client, HTTPHeader: tokenHeader()})
				if err != nil {
					t.Fatal(err)
				}
				defer c.CloseNow()
				start := time.Now()
				for flood.following.Load() == 0 || time.Since(start) < 100*time.Millisecond {
					time.Sleep(10 * time.Millisecond)
				}
				for flood.following.Load() > 0 {
					if time.Since(start) > 8*time.Second {
						t.Fatal("still written to")
					}
					time.Sleep(20 * time.Millisecond)
				}
				return answer{kind: refused, text: "the node stopped following and dropped the connection once a line waited past the write timeout"}
			}},
		logs("a `logs` handshake with `Sec-WebSocket-Version: 7`", func(t *testing.T, r *rig) answer {
			h := tokenHeader()
			for k, v := range map[string]string{"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "7", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="} {
				h.Set(k, v)
			}
			return r.do(t, r.request(t, "GET", "/control/machine/"+string(ownedRef)+"/logs", "", h))
		}),
	}
}

// readPast reads the two past lines a logs follower gets first.
func readPast(t *testing.T, ctx context.Context, c *websocket.Conn) {
	t.Helper()
	for range 2 {
		if _, _, err := c.Read(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// dialLogs opens the operator's logs websocket with header, expecting a
// refused handshake.
func dialLogs(t *testing.T, r *rig, header http.Header) answer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, wsURL(r, "/control/machine/"+string(ownedRef)+"/logs"), &websocket.DialOptions{HTTPClient: r.client, HTTPHeader: header})
	if err == nil {
		c.CloseNow()
		t.Errorf("the handshake succeeded")
		return answer{kind: refused, text: "ACCEPTED"}
	}
	if resp == nil {
		t.Fatal(err)
	}
	return httpAnswer(t, resp)
}
