package instance

import (
	"net/netip"

	"github.com/alephvm/alephvm/cloudinit"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
)

// instanceInputs are what an instance's VM is made of, once its disks are
// made and its network attached.
type instanceInputs struct {
	Ref     message.ItemHash
	Content *message.InstanceContent
	Root    hypervisor.Drive
	// Seed is where the cloud-init seed goes.
	Seed          string
	Volumes       []hypervisor.Drive
	Network       network.Attachment
	Boot          hypervisor.Boot
	RunDir        string
	DNS           []netip.Addr
	DeveloperKeys []string
}

// instanceSpec builds the cloud-init seed's config and the hypervisor's
// spec of an instance from its inputs, without side effects. The seed,
// second of the spec's drives, is to be written at its path.
func instanceSpec(in instanceInputs) (cloudinit.Config, hypervisor.Spec) {
	c, ref, att := in.Content, in.Ref, in.Network
	seed := cloudinit.Config{
		InstanceID:     "iid-alephvm-" + string(ref)[:16],
		Hostname:       "vm-" + string(ref)[:8],
		AuthorizedKeys: append(append([]string{}, c.AuthorizedKeys...), in.DeveloperKeys...),
		Internet:       c.Environment.Internet,
		Network:        cloudinit.Network{MAC: att.MAC(), Address: att.GuestPrefix(), Gateway: att.Host, DNS: in.DNS},
	}
	if v6 := att.IPv6; v6.Guest.IsValid() {
		seed.Network.IPv6, seed.Network.GatewayIPv6 = v6.GuestPrefix(), v6.Host
	}
	drives := append([]hypervisor.Drive{in.Root, {Path: in.Seed, ReadOnly: true, Serial: "cidata"}}, in.Volumes...)
	spec := hypervisor.Spec{
		Name: "inst-" + string(ref)[:12], Dir: in.RunDir,
		VCPUs: int(c.Resources.VCPUs), MemoryMiB: int(c.Resources.MemoryMiB),
		Boot:   in.Boot,
		Drives: drives,
		NICs:   []hypervisor.NIC{{Tap: att.Tap, MAC: att.MAC()}},
		// The node freezes the guest's filesystems through its agent
		// for a consistent backup (package backup).
		GuestAgent: true,
	}
	return seed, spec
}
