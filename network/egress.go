package network

import (
	"net/netip"
	"slices"
)

// nonPublic lists the destinations that are never the public internet:
// a VM reaching one through the uplink would reach the operator's own
// networks or the cloud's services (169.254.169.254 is the metadata
// service of most clouds, with the host's credentials).
var nonPublic = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),         // "this network"
	netip.MustParsePrefix("10.0.0.0/8"),        // private (RFC 1918)
	netip.MustParsePrefix("100.64.0.0/10"),     // shared address space, carrier-grade NAT and overlays (RFC 6598)
	netip.MustParsePrefix("127.0.0.0/8"),       // loopback
	netip.MustParsePrefix("169.254.0.0/16"),    // link-local: cloud metadata services
	netip.MustParsePrefix("172.16.0.0/12"),     // private (RFC 1918)
	netip.MustParsePrefix("192.168.0.0/16"),    // private (RFC 1918)
	netip.MustParsePrefix("224.0.0.0/4"),       // multicast
	netip.MustParsePrefix("240.0.0.0/4"),       // reserved, and the broadcast address
	netip.MustParsePrefix("::/128"),            // unspecified
	netip.MustParsePrefix("::1/128"),           // loopback
	netip.MustParsePrefix("::ffff:0.0.0.0/96"), // IPv4-mapped
	netip.MustParsePrefix("64:ff9b:1::/48"),    // local-use IPv4/IPv6 translation (RFC 8215)
	netip.MustParsePrefix("fc00::/7"),          // unique local (ULA)
	netip.MustParsePrefix("fe80::/10"),         // link-local
	netip.MustParsePrefix("fec0::/10"),         // site-local (deprecated, still routed by some)
	netip.MustParsePrefix("ff00::/8"),          // multicast
}

// blockedDestinations returns the networks a VM may not reach through the
// uplink: the non-public ranges and every network the host has a route
// to other than its default route, without the ones another covers, in
// order.
func blockedDestinations(hostRoutes []netip.Prefix) []netip.Prefix {
	all := append(slices.Clone(nonPublic), hostRoutes...)
	for i, p := range all {
		all[i] = p.Masked()
	}
	slices.SortFunc(all, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	var out []netip.Prefix
	for _, p := range all {
		if !p.IsValid() || p.Bits() == 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Addr().BitLen() == p.Addr().BitLen() && out[n-1].Bits() <= p.Bits() && out[n-1].Contains(p.Addr()) {
			continue
		}
		out = append(out, p)
	}
	return out
}
