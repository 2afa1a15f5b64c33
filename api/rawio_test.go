package api

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// writeThenRead writes a request and reads the first bytes of its answer
// in one wait: the answer is read whatever the request's size, and a peer
// that is gone or a deadline past ends it with an error, not a hang.
func TestWriteThenRead(t *testing.T) {
	big := bytes.Repeat([]byte("x"), 32<<20) // more than the sockets' buffers
	for _, tc := range []struct {
		name    string
		request []byte
		peer    func(c net.Conn, size int)
		before  func(c net.Conn)
		answer  string
		werr    bool // the write fails
		anyErr  bool // the write or the read fails
	}{
		{name: "answer after the request", request: []byte("ping"), peer: answerAfter("pong"), answer: "pong"},
		{name: "request larger than the socket's buffer", request: big, peer: answerAfter("done"), answer: "done"},
		{name: "peer gone", request: []byte("ping"), peer: func(c net.Conn, _ int) {
			time.Sleep(10 * time.Millisecond) // after the dial's end
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}, anyErr: true},
		{name: "peer closed", request: []byte("ping"), peer: func(c net.Conn, _ int) {
			time.Sleep(10 * time.Millisecond)
			c.Close() // a FIN: the write goes, the peer's reset ends the wait
		}, anyErr: true},
		{name: "deadline past", request: []byte("ping"), peer: answerAfter("pong"), before: func(c net.Conn) {
			c.SetDeadline(time.Now().Add(-time.Second))
		}, werr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				tc.peer(c, len(tc.request))
			}()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tc.anyErr {
				time.Sleep(60 * time.Millisecond) // the peer's reset has come
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second)) // no hang, whatever happens
			if tc.before != nil {
				tc.before(c)
			}
			buf := make([]byte, 64)
			n, werr, rerr := newRawIO(c).writeThenRead(tc.request, buf)
			switch {
			case tc.werr:
				if werr == nil || !errors.Is(werr, os.ErrDeadlineExceeded) || n != 0 {
					t.Errorf("got %d bytes, write error %v, read error %v; want the deadline's write error", n, werr, rerr)
				}
			case tc.anyErr:
				if werr == nil && rerr == nil {
					t.Errorf("got %q with no error from a peer gone", buf[:n])
				}
				if errors.Is(rerr, os.ErrDeadlineExceeded) {
					t.Errorf("waited until the deadline: %v", rerr)
				}
			default:
				if werr != nil || rerr != nil || string(buf[:n]) != tc.answer {
					t.Errorf("got %q, write error %v, read error %v; want %q", buf[:n], werr, rerr, tc.answer)
				}
			}
		})
	}
}

// answerAfter is a peer that reads the whole request, slowly, then
// answers.
func answerAfter(answer string) func(c net.Conn, size int) {
	return func(c net.Conn, size int) {
		time.Sleep(20 * time.Millisecond)
		if _, err := io.CopyN(io.Discard, c, int64(size)); err != nil {
			return
		}
		io.WriteString(c, answer)
	}
}
