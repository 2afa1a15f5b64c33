package testenv

import (
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

func TestDNSAnswer(t *testing.T) {
	records := map[string][]netip.Addr{"web.test.": {netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8::10")}}
	for _, tc := range []struct {
		name  string
		typ   dnsmessage.Type
		rcode dnsmessage.RCode
		want  string
	}{
		{"web.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, "203.0.113.10"},
		{"WEB.test.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, "2001:db8::10"},
		{"other.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, ""},
	} {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 7, RecursionDesired: true})
		b.StartQuestions()
		b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(tc.name), Type: tc.typ, Class: dnsmessage.ClassINET})
		query, _ := b.Finish()
		answer, err := dnsAnswer(query, records)
		if err != nil {
			t.Fatal(err)
		}
		var p dnsmessage.Parser
		h, err := p.Start(answer)
		if err != nil || h.ID != 7 || h.RCode != tc.rcode {
			t.Fatalf("%s: header %+v %v", tc.name, h, err)
		}
		p.SkipAllQuestions()
		answers, _ := p.AllAnswers()
		var got string
		for _, a := range answers {
			switch r := a.Body.(type) {
			case *dnsmessage.AResource:
				got = netip.AddrFrom4(r.A).String()
			case *dnsmessage.AAAAResource:
				got = netip.AddrFrom16(r.AAAA).String()
			}
		}
		if got != tc.want || len(answers) > 1 {
			t.Errorf("%s %v: %q (%d answers), want %q", tc.name, tc.typ, got, len(answers), tc.want)
		}
	}
}
