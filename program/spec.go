package program

import (
	"net/netip"
	"path/filepath"
	"strconv"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
)

// drivePlan is a drive a program's VM gets: its file, and what the guest
// init does with it.
type drivePlan struct {
	Path  string
	Drive guest.Drive
}

// specInputs are what a program VM is made of, once its files are fetched,
// its volumes made and its network attached.
type specInputs struct {
	Ref     message.ItemHash
	Content *message.ProgramContent
	// Drives are the runtime, the code, the data and the volumes, in this
	// order.
	Drives  []drivePlan
	Network network.Attachment
	DNS     []netip.Addr
	Boot    hypervisor.Boot
	Dir     string
}

// programSpec builds the guest init's config and the hypervisor's spec of
// a program VM from its inputs, without side effects. The config drive,
// first of the spec's drives, is to be written at its path with the
// config.
func programSpec(in specInputs) (guest.Config, hypervisor.Spec) {
	c := in.Content
	cfg := guest.Config{
		Version:  guest.ConfigVersion,
		Hostname: "vm-" + string(in.Ref)[:8],
		Network: &guest.Network{
			Address: in.Network.GuestPrefix(), Gateway: in.Network.Host, DNS: in.DNS,
		},
		Workload: guest.Workload{
			Interface:  guest.Interface(c.Code.InferredInterface()),
			Entrypoint: c.Code.Entrypoint,
			Args:       c.Code.Args,
			Variables:  c.Variables,
			// The subscriptions of an ASGI program: it takes events.
			Events: len(c.On.Message) > 0 && c.Code.InferredInterface() == message.InterfaceASGI,
		},
	}
	if v6 := in.Network.IPv6; v6.Guest.IsValid() {
		cfg.Network.Address6, cfg.Network.Gateway6 = v6.GuestPrefix(), v6.Host
	}
	drives := []hypervisor.Drive{{Path: filepath.Join(in.Dir, "config.img"), ReadOnly: true, Serial: "config"}}
	for i, d := range in.Drives {
		drives = append(drives, hypervisor.Drive{Path: d.Path, ReadOnly: d.Drive.ReadOnly, Serial: string(d.Drive.Role) + strconv.Itoa(i)})
		cfg.Drives = append(cfg.Drives, d.Drive)
	}
	spec := hypervisor.Spec{
		Name:      "prog-" + string(in.Ref)[:12],
		Dir:       in.Dir,
		VCPUs:     int(c.Resources.VCPUs),
		MemoryMiB: int(c.Resources.MemoryMiB),
		Boot:      in.Boot,
		Drives:    drives,
		NICs:      []hypervisor.NIC{{Tap: in.Network.Tap, MAC: in.Network.MAC()}},
		Control:   true, ControlPort: guest.ControlPortName,
		RebootExits: true,
	}
	return cfg, spec
}
