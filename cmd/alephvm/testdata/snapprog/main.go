// Command snapprog is a program for the snapshot tests: it answers with
// what must differ between two VMs restored from one template (its MAC,
// addresses and random bytes) and its wall clock.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"log"
	"net"
	"net/http"
	"os"
	"time"
)

type answer struct {
	MAC     string   `json:"mac"`
	Addrs   []string `json:"addrs"`
	Random  string   `json:"random"`
	URandom string   `json:"urandom"`
	TimeNS  int64    `json:"time_ns"`
	Env     string   `json:"env"`
}

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		a := answer{TimeNS: time.Now().UnixNano(), Env: os.Getenv("SNAP")}
		if eth, err := net.InterfaceByName("eth0"); err == nil {
			a.MAC = eth.HardwareAddr.String()
			addrs, _ := eth.Addrs()
			for _, ad := range addrs {
				a.Addrs = append(a.Addrs, ad.String())
			}
		}
		b := make([]byte, 32)
		rand.Read(b)
		a.Random = hex.EncodeToString(b)
		if f, err := os.Open("/dev/urandom"); err == nil {
			f.Read(b)
			f.Close()
			a.URandom = hex.EncodeToString(b)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(a)
	})
	log.Fatal(http.ListenAndServe(":8080", nil))
}
