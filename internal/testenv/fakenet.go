package testenv

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// The fake internet's services, run by the helper process inside a test's
// namespace: a DNS server with fixed records and a web server.

// ServeDNS answers DNS queries (UDP) on addr inside ns until the test
// ends: A and AAAA records of the names in records (name -> addresses),
// NXDOMAIN for other names.
func ServeDNS(t testing.TB, ns, addr string, records map[string][]netip.Addr) {
	t.Helper()
	var spec []string
	for name, addrs := range records {
		var list []string
		for _, a := range addrs {
			list = append(list, a.String())
		}
		spec = append(spec, strings.TrimSuffix(name, ".")+"="+strings.Join(list, "+"))
	}
	cmd := helper(ns, "dns", addr)
	cmd.Env = append(cmd.Env, helperEnv+"_RECORDS="+strings.Join(spec, ","))
	startHelper(t, cmd, "DNS on "+addr+" in "+ns)
}

// ServeWeb answers HTTP on addr inside ns until the test ends: 200 and
// "fake internet" for every request.
func ServeWeb(t testing.TB, ns, addr string) {
	t.Helper()
	startHelper(t, helper(ns, "web", addr), "web on "+addr+" in "+ns)
}

// startHelper starts a serving helper, stopped when the test ends, and
// waits for its "listening".
func startHelper(t testing.TB, cmd *exec.Cmd, what string) {
	t.Helper()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "listening" {
		t.Fatalf("%s: %s", what, line)
	}
	go io.Copy(io.Discard, out)
}

// runDNS serves the records of _RECORDS on addr (UDP).
func runDNS(addr string) error {
	records := map[string][]netip.Addr{}
	for _, entry := range strings.Split(os.Getenv(helperEnv+"_RECORDS"), ",") {
		name, list, ok := strings.Cut(entry, "=")
		if !ok {
			continue
		}
		for _, a := range strings.Split(list, "+") {
			if ip, err := netip.ParseAddr(a); err == nil {
				records[strings.ToLower(name)+"."] = append(records[strings.ToLower(name)+"."], ip)
			}
		}
	}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		if answer, err := dnsAnswer(buf[:n], records); err == nil {
			pc.WriteTo(answer, from)
		}
	}
}

// dnsAnswer answers one query from records.
func dnsAnswer(query []byte, records map[string][]netip.Addr) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	name := strings.ToLower(q.Name.String())
	addrs, known := records[name]
	rcode := dnsmessage.RCodeSuccess
	if !known {
		rcode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true, RCode: rcode})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}
	for _, a := range addrs {
		switch {
		case q.Type == dnsmessage.TypeA && a.Is4():
			err = b.AResource(rh, dnsmessage.AResource{A: a.As4()})
		case q.Type == dnsmessage.TypeAAAA && a.Is6():
			err = b.AAAAResource(rh, dnsmessage.AAAAResource{AAAA: a.As16()})
		}
		if err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// runWeb serves HTTP on addr.
func runWeb(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	return http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "fake internet")
	}))
}
