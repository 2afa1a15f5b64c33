// Command go-hello is a small static HTTP program for alephvm: build it
// with CGO_ENABLED=0, pack it with alephvm program create --interface
// binary, and it answers on port 8080.
package main

import (
	"crypto/sha256"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"

	"github.com/coder/websocket"
)

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello from a Go program on alephvm (%s)\n", r.URL.Path)
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
	// /crash ends the program with code 3, to show how a crash is reported.
	mux.HandleFunc("/crash", func(http.ResponseWriter, *http.Request) {
		log.Print("crashing on purpose")
		os.Exit(3)
	})
	log.Print("listening on :8080")
	log.Fatal(http.ListenAndServe(":8080", mux))
}
