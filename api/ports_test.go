package api

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/alephvm/alephvm/network"
)

func TestMappedPorts(t *testing.T) {
	got := MappedPorts([]network.Forward{
		{Proto: "tcp", HostPort: 24000, GuestPort: 22},
		{Proto: "tcp", HostPort: 24001, GuestPort: 53},
		{Proto: "udp", HostPort: 24001, GuestPort: 53},
		{Proto: "udp", HostPort: 24002, GuestPort: 5353},
		{Proto: "sctp", HostPort: 24003, GuestPort: 9}, // neither flag
	})
	want := map[string]MappedPort{
		"22":   {Host: 24000, TCP: true},
		"53":   {Host: 24001, TCP: true, UDP: true},
		"5353": {Host: 24002, UDP: true},
		"9":    {Host: 24003},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if m := MappedPorts(nil); m == nil || len(m) != 0 {
		t.Errorf("no forwards: %v", m)
	}
}
