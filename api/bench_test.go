package api

import (
	"io"
	"net/http"
	"testing"
	"time"
)

// BenchmarkProxy sends the same requests through the node's proxy and
// straight to the program (here an HTTP server on loopback, so that only
// the node's own cost shows) and reports both rates and their ratio.
func BenchmarkProxy(b *testing.B) {
	hello := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	l := &launcher{handler: hello}
	srv := newTestAPI(b, l)
	client := &http.Client{}
	get := func(url string) {
		resp, err := client.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	via := srv.URL + "/vm/" + string(ref) + "/"
	get(via) // boots the stand-in program
	l.mu.Lock()
	direct := l.last.srv.URL + "/"
	l.mu.Unlock()
	var viaTime, directTime time.Duration
	for range b.N {
		start := time.Now()
		get(via)
		viaTime += time.Since(start)
		start = time.Now()
		get(direct)
		directTime += time.Since(start)
	}
	b.ReportMetric(float64(b.N)/viaTime.Seconds(), "req/s-via-node")
	b.ReportMetric(float64(b.N)/directTime.Seconds(), "req/s-direct")
	b.ReportMetric(directTime.Seconds()/viaTime.Seconds(), "ratio")
}
