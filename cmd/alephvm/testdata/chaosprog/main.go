// Command chaosprog is the program of the chaos suite (TestChaos): it
// answers on port 8080 and, on /write?name=N, writes the file N on its
// persistent volume (/data), syncs it and its directory, and only then
// answers: a 200 is the promise that the file survives any crash. On
// /read?name=N it answers the file's bytes.
package main

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
)

const dir = "/data"

var validName = regexp.MustCompile(`^[a-z0-9-]{1,64}$`)

func main() {
	http.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
		name := r.URL.Query().Get("name")
		if !validName.MatchString(name) {
			http.Error(w, "bad name", http.StatusBadRequest)
			return
		}
		if err := writeSynced(filepath.Join(dir, name), []byte("chaos "+name+"\n")); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(w, "written %s\n", name)
	})
	http.HandleFunc("/read", func(w http.ResponseWriter, r *http.Request) {
		name := r.URL.Query().Get("name")
		if !validName.MatchString(name) {
			http.Error(w, "bad name", http.StatusBadRequest)
			return
		}
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Write(data)
	})
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "chaos program")
	})
	if err := http.ListenAndServe(":8080", nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func writeSynced(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
