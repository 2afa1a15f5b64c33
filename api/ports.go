package api

import (
	"strconv"

	"github.com/alephvm/alephvm/network"
)

// MappedPorts groups an instance's forwards by guest port into the
// reference's mapped_ports: the host port that forwards to each guest
// port, and the protocols it forwards.
func MappedPorts(forwards []network.Forward) map[string]MappedPort {
	out := make(map[string]MappedPort, len(forwards))
	for _, f := range forwards {
		key := strconv.Itoa(int(f.GuestPort))
		mp := out[key]
		mp.Host = int(f.HostPort)
		mp.TCP = mp.TCP || f.Proto == "tcp"
		mp.UDP = mp.UDP || f.Proto == "udp"
		out[key] = mp
	}
	return out
}
