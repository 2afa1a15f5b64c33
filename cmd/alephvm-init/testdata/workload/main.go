// Command workload is the binary program of alephvm-init's VM tests: it
// serves HTTP on port 8080 and does, on request, what the tests check the
// init copes with.
package main

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	fmt.Println("workload starting")
	fmt.Fprintln(os.Stderr, "workload stderr line")
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			fmt.Printf("got signal: %v\n", s)
			if s == syscall.SIGTERM {
				os.Exit(0)
			}
		}
	}()

	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		host, _ := os.Hostname()
		fmt.Fprintf(w, "hello from %s as %d:%d\n", host, os.Getuid(), os.Getgid())
	})
	http.HandleFunc("/env", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getenv(r.URL.Query().Get("name")))
	})
	http.HandleFunc("/read", func(w http.ResponseWriter, r *http.Request) {
		b, err := os.ReadFile(r.URL.Query().Get("path"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Write(b)
	})
	http.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if err := os.WriteFile(q.Get("path"), []byte(q.Get("data")), 0o644); err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		fmt.Fprintln(w, "written")
	})
	// Orphans: each shell exits at once and leaves a sleep that the
	// kernel hands to PID 1, which must reap it.
	http.HandleFunc("/orphans", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		for range n {
			exec.Command("/bin/sh", "-c", "sleep 0.2 &").Run()
		}
		fmt.Fprintln(w, "spawned", n)
	})
	http.HandleFunc("/oom", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "allocating")
		w.(http.Flusher).Flush()
		var hog [][]byte
		for {
			b := make([]byte, 16<<20)
			for i := 0; i < len(b); i += 4096 {
				b[i] = 1 // a byte per page makes it resident
			}
			hog = append(hog, b)
		}
	})
	http.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
		code, _ := strconv.Atoi(r.URL.Query().Get("code"))
		fmt.Fprintln(w, "exiting with", code)
		go func() {
			time.Sleep(50 * time.Millisecond)
			os.Exit(code)
		}()
	})
	if err := http.ListenAndServe(":8080", nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
