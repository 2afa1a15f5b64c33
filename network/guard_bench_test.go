package network

import (
	"fmt"
	"net/netip"
	"testing"
)

// BenchmarkGuard measures what the guard costs a VM's packets: frames
// written into a real tap and forwarded to the uplink, with no table, with
// a table of the one VM, and with a table of many VMs where it is the last
// one the guard's linear dispatch reaches. The ratios to the table of one
// VM are printed.
//
//	flock /tmp/alephvm-vm.lock go test -run - -bench Guard ./network
func BenchmarkGuard(b *testing.B) {
	testNode(b)
	vm := testVMs(b)[0]
	if err := CreateTap(vm.Tap, vm.host); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = DeleteTap(vm.Tap) })
	tap := openGuestTap(b, vm.VMRules)
	frame := tap.udp4(vm.Guest, netip.MustParseAddr("203.0.113.10"), 9, "bench")
	fw := NewFirewall("up0", testPool)
	b.Cleanup(func() { _ = fw.Remove() })

	others := func(n int) []VMRules {
		var out []VMRules
		pool, _ := NewPool(testPool, 24, 4)
		for i := range n {
			a, _ := pool.At(100 + i)
			out = append(out, VMRules{Tap: a.Tap, MAC: a.MAC(), Guest: a.Guest, Internet: true})
		}
		return out
	}
	nsPerFrame := map[string]float64{}
	for _, c := range []struct {
		name string
		vms  []VMRules // nil: no table
	}{
		{"no table", nil},
		{"1 VM", []VMRules{vm.VMRules}},
		{"100 VMs", append(others(99), vm.VMRules)},
		{"500 VMs", append(others(499), vm.VMRules)},
	} {
		b.Run(c.name, func(b *testing.B) {
			if c.vms == nil {
				if err := fw.Remove(); err != nil {
					b.Fatal(err)
				}
			} else if err := fw.Apply(c.vms); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				tap.write(b, frame)
			}
			nsPerFrame[c.name] = float64(b.Elapsed().Nanoseconds()) / float64(b.N)
		})
	}
	// The table brings conntrack and NAT as well as the guard: the cost
	// of the guard's dispatch is the difference between its sizes.
	base := nsPerFrame["1 VM"]
	for _, name := range []string{"no table", "100 VMs", "500 VMs"} {
		if base > 0 && nsPerFrame[name] > 0 {
			fmt.Printf("guard: %s: %.0f ns per frame, %.2fx the table of 1 VM (%.0f ns)\n", name, nsPerFrame[name], nsPerFrame[name]/base, base)
		}
	}
}
