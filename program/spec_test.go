package program

import (
	"context"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
)

// TestProgramSpecGolden: the guest config and hypervisor spec of
// representative programs, from fixed inputs (UPDATE_GOLDEN=1 rewrites
// testdata/spec-*.json).
func TestProgramSpecGolden(t *testing.T) {
	att := network.Attachment{Allocation: network.Allocation{Index: 4, Network: netip.MustParsePrefix("172.16.4.0/24"),
		Host: netip.MustParseAddr("172.16.4.1"), Guest: netip.MustParseAddr("172.16.4.2"), Tap: "avm4"}}
	boot := hypervisor.Boot{Kernel: "/k/bzImage", Initrd: "/k/initramfs", Cmdline: "console=ttyS0"}
	for _, tc := range []struct {
		name    string
		volumes []any
		drives  []drivePlan
		ipv6    bool
	}{
		{"asgi-ephemeral", []any{map[string]any{"ephemeral": true, "mount": "/tmp/e", "size_mib": 8}}, []drivePlan{
			{"/store/runtime", guest.Drive{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true}},
			{"/store/code", guest.Drive{Role: guest.RoleCode, Format: guest.FormatZip, Mount: "/opt/code", ReadOnly: true, Size: 4}},
			{"/run/avm4/ephemeral-0.ext4", guest.Drive{Role: guest.RoleVolume, Format: guest.FormatExt4, Mount: "/tmp/e"}},
		}, false},
		{"persistent-and-immutable", []any{
			map[string]any{"persistence": "host", "name": "db", "mount": "/var/lib/db", "size_mib": 16},
			map[string]any{"ref": "7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003", "use_latest": true, "mount": "/opt/lib"},
		}, []drivePlan{
			{"/store/runtime", guest.Drive{Role: guest.RoleRuntime, Format: guest.FormatSquashfs, Mount: "/", ReadOnly: true}},
			{"/store/code", guest.Drive{Role: guest.RoleCode, Format: guest.FormatZip, Mount: "/opt/code", ReadOnly: true, Size: 4}},
			{"/volumes/ref/db.ext4", guest.Drive{Role: guest.RoleVolume, Format: guest.FormatExt4, Mount: "/var/lib/db", Persistent: true, Name: "db"}},
			{"/store/lib", guest.Drive{Role: guest.RoleVolume, Format: guest.FormatSquashfs, Mount: "/opt/lib", ReadOnly: true}},
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, ref := programStoreWith(t, tc.volumes)
			msg, _, err := st.Message(context.Background(), ref)
			if err != nil {
				t.Fatal(err)
			}
			// The stored message's hash changes with its items': a fixed
			// ref keeps the golden file stable.
			fixed := message.ItemHash("29021c70344e1c4d0e0d1a9b2f3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e")
			att := att
			if tc.ipv6 {
				var err error
				att.IPv6.Network, att.IPv6.Host, att.IPv6.Guest, err = network.StaticIPv6(netip.MustParsePrefix("fc00:1:2:3::/64"), int(network.KindProgram), string(fixed))
				if err != nil {
					t.Fatal(err)
				}
			}
			cfg, spec := programSpec(specInputs{Ref: fixed, Content: msg.Content.(*message.ProgramContent), Drives: tc.drives, Network: att,
				DNS: []netip.Addr{netip.MustParseAddr("10.0.0.53")}, Boot: boot, Dir: "/run/avm4"})
			if err := cfg.Validate(); err != nil {
				t.Errorf("the config is not valid: %v", err)
			}
			out, err := json.MarshalIndent(map[string]any{"guest_config": cfg, "hypervisor_spec": spec}, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			testenv.Golden(t, filepath.Join("testdata", "spec-"+tc.name+".json"), append(out, '\n'))
		})
	}
}
