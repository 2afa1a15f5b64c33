package firecracker

import (
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
)

func mac(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }

// jailed returns the paths of spec's config in its jail, as the driver
// writes them.
func jailed(t *testing.T, spec hypervisor.Spec) Paths {
	_, paths, err := PlanJail(spec, "/var/lib/alephvm/jail", "firecracker", 1000000, 1000000)
	if err != nil {
		t.Fatal(err)
	}
	return paths
}

func TestConfigGolden(t *testing.T) {
	spec := loadSpec(t)
	program := hypervisor.Spec{
		Name: "prog-1f2e3d", Dir: "/run/alephvm/vms/1f2e3d", VCPUs: 1, MemoryMiB: 128,
		Boot: hypervisor.Boot{Kernel: "/var/cache/alephvm/assets/vmlinux", Initrd: "/var/cache/alephvm/assets/initramfs.cpio.gz",
			Cmdline: "console=ttyS0 quiet"},
		Drives: []hypervisor.Drive{
			{Path: "/run/alephvm/vms/1f2e3d/config.img", ReadOnly: true},
			{Path: "/var/cache/alephvm/store/runtime.squashfs", ReadOnly: true},
			{Path: "/var/cache/alephvm/store/code.squashfs", ReadOnly: true},
		},
		NICs:    []hypervisor.NIC{{Tap: "avm4", MAC: mac("06:00:ac:10:04:02")}},
		Control: true, ControlPort: "org.alephvm.control", RebootExits: true,
	}
	withVolumes := program
	withVolumes.Drives = append(append([]hypervisor.Drive{}, program.Drives...),
		hypervisor.Drive{Path: "/var/cache/alephvm/store/venv.squashfs", ReadOnly: true},
		hypervisor.Drive{Path: "/var/lib/alephvm/volumes/1f2e3d/cache.ext4"},
		hypervisor.Drive{Path: "/var/lib/alephvm/volumes/1f2e3d/sqlite-data.ext4"},
	)
	instance := hypervisor.Spec{
		Name: "inst-9a8b7c", Dir: "/run/alephvm/vms/9a8b7c", VCPUs: 2, MemoryMiB: 2048,
		Boot: hypervisor.Boot{Kernel: "/var/cache/alephvm/assets/vmlinux", Cmdline: "console=ttyS0 root=/dev/vda rw"},
		Drives: []hypervisor.Drive{
			{Path: "/var/lib/alephvm/volumes/9a8b7c/rootfs.raw"},
			{Path: "/var/lib/alephvm/volumes/9a8b7c/cidata.iso", ReadOnly: true},
		},
		NICs: []hypervisor.NIC{{Tap: "avm5", MAC: mac("06:00:ac:10:05:02")}},
	}
	for name, s := range map[string]hypervisor.Spec{"program": program, "program-volumes": withVolumes, "instance": instance} {
		t.Run(name, func(t *testing.T) {
			c, err := BuildConfig(s, jailed(t, s))
			if err != nil {
				t.Fatal(err)
			}
			got, _ := json.MarshalIndent(c, "", "  ")
			got = append(got, '\n')
			checkAgainstSpec(t, spec, got)
			testenv.Golden(t, filepath.Join("testdata", name+".json"), got)
		})
	}
}

func TestConfigRefusals(t *testing.T) {
	base := hypervisor.Spec{Name: "x", Dir: "/run/x", VCPUs: 1, MemoryMiB: 128,
		Boot: hypervisor.Boot{Kernel: "/k"}, Drives: []hypervisor.Drive{{Path: "/d"}}}
	noKernel := base
	noKernel.Boot.Kernel = ""
	qcow := base
	qcow.Drives = []hypervisor.Drive{{Path: "/d.qcow2", Format: "qcow2"}}
	many := base
	many.VCPUs = 64
	for name, s := range map[string]hypervisor.Spec{"no kernel": noKernel, "qcow2": qcow, "64 vcpus": many} {
		if _, err := BuildConfig(s, Paths{}); err == nil || !strings.Contains(err.Error(), "firecracker") {
			t.Errorf("%s: %v", name, err)
		}
	}
}
