package qemu

import (
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
)

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func programSpec() hypervisor.Spec {
	return hypervisor.Spec{
		Name: "prog-1f2e3d", Dir: "/run/alephvm/vms/1f2e3d", VCPUs: 1, MemoryMiB: 256,
		Boot: hypervisor.Boot{Kernel: "/var/cache/alephvm/assets/bzImage", Initrd: "/var/cache/alephvm/assets/initramfs.cpio.gz",
			Cmdline: "console=ttyS0 quiet panic=-1"},
		Drives: []hypervisor.Drive{
			{Path: "/run/alephvm/vms/1f2e3d/config.img", ReadOnly: true, Serial: "config"},
			{Path: "/var/cache/alephvm/store/runtime,odd.squashfs", ReadOnly: true, Serial: "rootfs"},
			{Path: "/var/lib/alephvm/volumes/1f2e3d/data.ext4", Serial: "vol0"},
		},
		NICs:        []hypervisor.NIC{{Tap: "avm1f2e3d", MAC: mac("06:00:ac:10:04:02")}},
		Control:     true,
		ControlPort: "org.alephvm.control",
		RebootExits: true,
	}
}

func instanceSpec() hypervisor.Spec {
	return hypervisor.Spec{
		Name: "inst-9a8b7c", Dir: "/run/alephvm/vms/9a8b7c", VCPUs: 2, MemoryMiB: 2048,
		Boot: hypervisor.Boot{FirmwareCode: "/usr/share/OVMF/OVMF_CODE_4M.fd", FirmwareVars: "/var/lib/alephvm/volumes/9a8b7c/efivars.fd"},
		Drives: []hypervisor.Drive{
			{Path: "/var/lib/alephvm/volumes/9a8b7c/rootfs.qcow2", Format: "qcow2",
				Backing: []hypervisor.Layer{{Path: "/var/lib/alephvm/volumes/9a8b7c/base", Format: "raw"}}},
			{Path: "/var/lib/alephvm/volumes/9a8b7c/standalone.qcow2", Format: "qcow2"},
			{Path: "/var/lib/alephvm/volumes/9a8b7c/cidata.iso", ReadOnly: true},
		},
		NICs:       []hypervisor.NIC{{Tap: "avm9a8b7c", MAC: mac("06:00:ac:10:05:02")}},
		GuestAgent: true,
	}
}

// layeredSpec is a root disk over a chain of two layers, as layered
// base images will be: every node names its backing.
func layeredSpec() hypervisor.Spec {
	spec := instanceSpec()
	spec.Boot = hypervisor.Boot{}
	spec.Drives = []hypervisor.Drive{{Path: "/v/rootfs.qcow2", Format: "qcow2", Backing: []hypervisor.Layer{
		{Path: "/store/layer-2,odd.qcow2", Format: "qcow2"}, {Path: "/store/layer-1.qcow2", Format: "qcow2"}}}}
	return spec
}

func TestArgsGolden(t *testing.T) {
	cases := []struct {
		name  string
		spec  hypervisor.Spec
		accel string
		runAs string
	}{
		{"program-tcg", programSpec(), "tcg", "1100000:1100000"},
		{"program-tcg-root", programSpec(), "tcg", ""},
		{"instance-kvm-runas", instanceSpec(), "kvm", "alephvm-qemu"},
		{"layered-tcg", layeredSpec(), "tcg", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args, err := Args(tc.spec, tc.accel, tc.runAs)
			if err != nil {
				t.Fatal(err)
			}
			testenv.Golden(t, filepath.Join("testdata", tc.name+".args"), []byte(strings.Join(args, "\n")+"\n"))
		})
	}
}

// QEMU drops to its user with its sandbox on, which then must allow the
// drop itself; as root, the sandbox forbids any change of identity.
func TestArgsRunAsAndSandbox(t *testing.T) {
	for runAs, elevate := range map[string]string{"1100000:1100000": "allow", "alephvm-qemu": "allow", "": "deny"} {
		args, err := Args(programSpec(), "tcg", runAs)
		if err != nil {
			t.Fatal(err)
		}
		line := strings.Join(args, " ")
		if !strings.Contains(line, " -sandbox on,obsolete=deny,elevateprivileges="+elevate+",spawn=deny,resourcecontrol=deny ") {
			t.Errorf("run as %q: sandbox not on with elevateprivileges=%s: %s", runAs, elevate, line)
		}
		if got := strings.Contains(line, " -runas "+runAs+" "); got != (runAs != "") {
			t.Errorf("run as %q: -runas in the command line: %v", runAs, got)
		}
	}
}

func TestArgsRefusesBadSpecs(t *testing.T) {
	long := programSpec()
	long.Dir = "/" + strings.Repeat("d", 100)
	noBoot := instanceSpec()
	noBoot.Drives = nil
	badTap := programSpec()
	badTap.NICs[0].Tap = "a-name-longer-than-15"
	badName := programSpec()
	badName.Name = "a,b"
	rawBacked := instanceSpec()
	rawBacked.Drives[0].Format = "raw"
	rawInMiddle := layeredSpec()
	rawInMiddle.Drives[0].Backing[0].Format = "raw"
	probed := layeredSpec()
	probed.Drives[0].Backing[1].Format = ""
	for name, spec := range map[string]hypervisor.Spec{"long dir": long, "no boot": noBoot, "tap": badTap, "name": badName,
		"raw drive with a backing": rawBacked, "raw layer over another": rawInMiddle, "layer without format": probed} {
		if _, err := Args(spec, "tcg", ""); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := Args(programSpec(), "hvf", ""); err == nil {
		t.Error("unknown accelerator accepted")
	}
}

// Under TCG a guest of one vCPU gets room for a second, for QEMU to make
// its locked instructions, its barriers, atomic (see SMP); KVM and larger
// guests are given what they asked for.
func TestSMP(t *testing.T) {
	for _, tc := range []struct {
		vcpus int
		accel string
		want  string
	}{
		{1, "tcg", "1,maxcpus=2"},
		{2, "tcg", "2"},
		{1, "kvm", "1"},
		{4, "kvm", "4"},
	} {
		if got := SMP(tc.vcpus, tc.accel); got != tc.want {
			t.Errorf("SMP(%d, %s) = %q, want %q", tc.vcpus, tc.accel, got, tc.want)
		}
	}
}

// The kernel of such a guest is told it has one CPU; others are left as
// they are.
func TestKernelCmdline(t *testing.T) {
	for _, tc := range []struct {
		vcpus   int
		accel   string
		cmdline string
		want    string
	}{
		{1, "tcg", "console=ttyS0", "console=ttyS0 nr_cpus=1"},
		{2, "tcg", "console=ttyS0", "console=ttyS0"},
		{1, "kvm", "console=ttyS0", "console=ttyS0"},
		{1, "tcg", "", ""},
	} {
		spec := hypervisor.Spec{VCPUs: tc.vcpus, Boot: hypervisor.Boot{Cmdline: tc.cmdline}}
		if got := KernelCmdline(spec, tc.accel); got != tc.want {
			t.Errorf("KernelCmdline(%d vCPUs, %s, %q) = %q, want %q", tc.vcpus, tc.accel, tc.cmdline, got, tc.want)
		}
	}
}
