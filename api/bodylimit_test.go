package api

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/pool"
)

// A body past the limit of a control route is answered 413, and the
// client reads that answer: the node reads bodies through
// http.MaxBytesReader on the connection's own writer, so that the server
// closes the connection gracefully (FIN, then a wait) rather than reset
// it while the client still writes, which loses the answer.
func TestOversizedBodiesAreAnswered(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sum := sha256.Sum256([]byte("good"))
	alloc, err := auth.NewAllocation(auth.AllocationOptions{TokenHash: hex.EncodeToString(sum[:])})
	if err != nil {
		t.Fatal(err)
	}
	r := newOwnerRig(t)
	srv := httptest.NewServer(New(Options{Programs: pool.New(pool.Options{Log: log}), Instances: r.inst, Auth: alloc,
		OwnerAuth: auth.NewOwner(auth.OwnerOptions{Domain: "127.0.0.1"}), Machines: fakeMachines{ref: {Owner: ownerAddress, Type: TypeInstance}},
		MaxBodyBytes: 1 << 20, Version: "test", Log: log}))
	t.Cleanup(srv.Close)
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	body := bytes.Repeat([]byte("x"), 4<<20)
	owner := r.client(ownerKey, 0)
	owner.NodeURL = srv.URL
	for _, tc := range []struct {
		name string
		req  func() *http.Request
	}{
		{"scheduler's call", func() *http.Request {
			req, _ := http.NewRequest("POST", srv.URL+"/control/allocations", bytes.NewReader(body))
			req.Header.Set("X-Auth-Signature", "good")
			return req
		}},
		{"signed call, its length announced", func() *http.Request {
			req, _ := http.NewRequest("POST", srv.URL+"/control/allocations", bytes.NewReader(body))
			req.Header.Set("Authorization", "Aleph-EIP191-V1 sig=0x00,payload=0x00")
			return req
		}},
		{"program request, its length announced", func() *http.Request {
			req, _ := http.NewRequest("POST", srv.URL+"/vm/"+string(ref)+"/upload", bytes.NewReader(body))
			return req
		}},
		{"owner's call", func() *http.Request {
			signed := owner.Request("POST", string(ref), "expire")
			req, _ := http.NewRequest("POST", signed.URL.String(), bytes.NewReader(body))
			req.Header = signed.Header
			return req
		}},
	} {
		if tc.name == "program request, its length announced" {
			// A client that announces a body and sends none is answered
			// all the same.
			conn, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintf(conn, "POST /vm/%s/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", ref, 2<<30)
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
				t.Errorf("a client that sends no body: %v %v", resp, err)
			}
			conn.Close()
		}
		resets := 0
		for range 50 {
			resp, err := client.Do(tc.req())
			if err != nil {
				resets++
				continue
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestEntityTooLarge {
				t.Errorf("%s: status %d, want 413", tc.name, resp.StatusCode)
			}
		}
		if resets > 0 {
			t.Errorf("%s: %d of 50 clients lost the answer to a connection reset", tc.name, resets)
		}
	}
}
