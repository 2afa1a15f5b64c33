package instance

import (
	"encoding/json"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
)

// TestInstanceSpecGolden: the cloud-init config and hypervisor spec of
// representative instances, from fixed inputs (UPDATE_GOLDEN=1 rewrites
// testdata/spec-*.json).
func TestInstanceSpecGolden(t *testing.T) {
	att := network.Attachment{Allocation: network.Allocation{Index: 4, Network: netip.MustParsePrefix("172.16.4.0/24"),
		Host: netip.MustParseAddr("172.16.4.1"), Guest: netip.MustParseAddr("172.16.4.2"), Tap: "avm4"}}
	const ref = message.ItemHash("7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003")
	for _, tc := range []struct {
		name    string
		content map[string]any
		root    hypervisor.Drive
		boot    hypervisor.Boot
		volumes []hypervisor.Drive
		ipv6    bool
	}{
		{"uefi-qemu", map[string]any{
			"authorized_keys": []string{"ssh-ed25519 AAAA owner"},
			"environment":     map[string]any{"internet": true, "hypervisor": "qemu"},
			"resources":       map[string]any{"vcpus": 2, "memory": 2048, "seconds": 30},
			"rootfs":          map[string]any{"parent": map[string]any{"ref": string(ref), "use_latest": true}, "persistence": "host", "size_mib": 20480},
			"volumes":         []any{map[string]any{"name": "data", "persistence": "host", "size_mib": 1024, "mount": "/data"}},
		}, hypervisor.Drive{Path: "/volumes/ref/rootfs.qcow2", Format: "qcow2", Serial: "rootfs"},
			hypervisor.Boot{FirmwareCode: "/usr/share/OVMF/OVMF_CODE_4M.fd", FirmwareVars: "/volumes/ref/efivars.fd"},
			[]hypervisor.Drive{{Path: "/volumes/ref/volume-data.ext4", Serial: "vol0"}}, true},
		{"ext4-firecracker", map[string]any{
			"authorized_keys": []string{"ssh-ed25519 AAAA owner"},
			"environment":     map[string]any{"internet": false, "hypervisor": "firecracker"},
			"resources":       map[string]any{"vcpus": 1, "memory": 512, "seconds": 30},
			"rootfs":          map[string]any{"parent": map[string]any{"ref": string(ref), "use_latest": false}, "persistence": "host", "size_mib": 4096},
		}, hypervisor.Drive{Path: "/volumes/ref/rootfs.raw", Serial: "rootfs"},
			hypervisor.Boot{Kernel: "/base/vmlinux", Initrd: "/base/initramfs", Cmdline: "console=ttyS0 root=/dev/vda"}, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.content["address"], tc.content["time"], tc.content["allow_amend"] = "0x1", 1700000000, false
			env := map[string]any{"chain": "ETH", "sender": "0x1", "type": "INSTANCE", "time": 1700000000, "item_type": "inline", "signature": nil, "content": tc.content}
			raw, _ := json.Marshal(env)
			raw, err := message.Regenerate(raw)
			if err != nil {
				t.Fatal(err)
			}
			msg, err := message.Parse(raw)
			if err != nil {
				t.Fatal(err)
			}
			att := att
			if tc.ipv6 {
				var err error
				att.IPv6.Network, att.IPv6.Host, att.IPv6.Guest, err = network.StaticIPv6(netip.MustParsePrefix("fc00:1:2:3::/64"), int(network.KindInstance), string(ref))
				if err != nil {
					t.Fatal(err)
				}
			}
			seed, spec := instanceSpec(instanceInputs{Ref: ref, Content: msg.Content.(*message.InstanceContent), Root: tc.root,
				Seed: "/volumes/ref/cidata.iso", Volumes: tc.volumes, Network: att, Boot: tc.boot, RunDir: "/run/i-7eb2eca2378ea885",
				DNS: []netip.Addr{netip.MustParseAddr("10.0.0.53")}, DeveloperKeys: []string{"ssh-ed25519 AAAA dev"}})
			out, err := json.MarshalIndent(map[string]any{"cloud_init": seed, "hypervisor_spec": spec}, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			testenv.Golden(t, filepath.Join("testdata", "spec-"+tc.name+".json"), append(out, '\n'))
		})
	}
}
