// Command loadprog is the program the load suite (TestLoad) deploys on
// every VM: small answers, streamed ones, large ones for slow readers,
// uploads and websockets. Build it with CGO_ENABLED=0 and pack it with
// alephvm program create --interface binary; it answers on port 8080.
package main

import (
	"crypto/sha256"
	"fmt"
	"io"
	"log"
	"net/http"
	"strconv"

	"github.com/coder/websocket"
)

// pattern is the byte at offset i of every large or streamed answer, so
// that a client can check what it read without keeping a copy.
func pattern(i int64) byte { return byte(i*7 + i>>10) }

// fill writes pattern bytes from offset off into p.
func fill(p []byte, off int64) {
	for i := range p {
		p[i] = pattern(off + int64(i))
	}
}

// sizeParam reads the query parameter name, a byte count, or def.
func sizeParam(r *http.Request, name string, def int64) int64 {
	if n, err := strconv.ParseInt(r.URL.Query().Get(name), 10, 64); err == nil && n >= 0 {
		return n
	}
	return def
}

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /small", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "small %s\n", r.URL.RawQuery)
	})
	// /stream writes n chunks of size bytes, flushing each: an answer of
	// unknown length, sent as the program makes it.
	mux.HandleFunc("GET /stream", func(w http.ResponseWriter, r *http.Request) {
		n, size := sizeParam(r, "n", 16), sizeParam(r, "size", 4096)
		buf := make([]byte, size)
		rc := http.NewResponseController(w)
		for i := range n {
			fill(buf, i*size)
			if _, err := w.Write(buf); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
	})
	// /large answers size bytes with their length announced.
	mux.HandleFunc("GET /large", func(w http.ResponseWriter, r *http.Request) {
		size := sizeParam(r, "size", 1<<20)
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		buf := make([]byte, 64<<10)
		for off := int64(0); off < size; off += int64(len(buf)) {
			part := buf[:min(int64(len(buf)), size-off)]
			fill(part, off)
			if _, err := w.Write(part); err != nil {
				return
			}
		}
	})
	// /upload answers the size and sha256 of what it received.
	mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %x\n", n, h.Sum(nil))
	})
	// /ws echoes every websocket message.
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		for {
			typ, data, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, data); err != nil {
				return
			}
		}
	})
	log.Print("listening on :8080")
	log.Fatal(http.ListenAndServe(":8080", mux))
}
