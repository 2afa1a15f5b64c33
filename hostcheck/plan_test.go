package hostcheck

import (
	"errors"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/storage"
)

// A host where everything works, and the ways hosts fall short of it.
func goodHost() Host {
	ok := func(s string) Probe { return Probe{OK: true, Found: s} }
	return Host{
		KVM: ok("kvm runs guests"), Firecracker: ok("firecracker v1.16.1"), Jailer: ok("jailer v1.16.1"),
		QEMU: ok("qemu 7.2"), DeviceMapper: ok("dm here"), Reflink: ok("reflinks here"),
		NFTables: ok("nft"), Tun: ok("tun"), Cgroups: ok("cgroup v2"), Vsock: ok("unix sockets"), Firmware: ok("OVMF"), Tools: ok("tools"),
	}
}

func with(change func(*Host)) Host {
	h := goodHost()
	change(&h)
	return h
}

var (
	noKVM       = with(func(h *Host) { h.KVM = Probe{Found: "kvm runs no guest"} })
	noFC        = with(func(h *Host) { h.Firecracker = Probe{Found: "firecracker not found"} })
	noJailer    = with(func(h *Host) { h.Jailer = Probe{Found: "jailer not found"} })
	noCgroups   = with(func(h *Host) { h.Cgroups = Probe{Found: "no memory controller"} })
	noQEMU      = with(func(h *Host) { h.QEMU = Probe{Found: "qemu not found"} })
	noKVMNoQEMU = with(func(h *Host) { h.KVM, h.QEMU = Probe{Found: "kvm runs no guest"}, Probe{Found: "qemu not found"} })
	// This machine: KVM that runs no ordinary guest, no Firecracker.
	here = with(func(h *Host) {
		h.KVM, h.Firecracker, h.Jailer = Probe{Found: "kvm runs no guest"}, Probe{Found: "firecracker not found"}, Probe{Found: "jailer not found"}
		h.DeviceMapper, h.Reflink = Probe{Found: "no dm"}, Probe{Found: "ext4: no reflinks"}
	})
)

var defaults = Settings{Hypervisors: []string{QEMU, Firecracker}, ProgramHypervisor: "auto", InstanceDefault: QEMU, UseJailer: true}

func set(change func(*Settings)) Settings {
	s := defaults
	change(&s)
	return s
}

func TestPrograms(t *testing.T) {
	for _, tc := range []struct {
		name     string
		host     Host
		settings Settings
		want     string // hypervisor, or words of the error
	}{
		{"firecracker where it runs", goodHost(), defaults, Firecracker},
		{"qemu without kvm", noKVM, defaults, QEMU},
		{"qemu without firecracker", noFC, defaults, QEMU},
		{"qemu without the jailer", noJailer, defaults, QEMU},
		{"qemu without cgroup controllers for the jailer", noCgroups, defaults, QEMU},
		{"unjailed needs no jailer", noJailer, set(func(s *Settings) { s.UseJailer = false }), Firecracker},
		{"this machine", here, defaults, QEMU},
		{"qemu preferred", goodHost(), set(func(s *Settings) { s.ProgramHypervisor = QEMU }), QEMU},
		{"firecracker forbidden", goodHost(), set(func(s *Settings) { s.Hypervisors = []string{QEMU} }), QEMU},
		{"firecracker asked, none here", here, set(func(s *Settings) { s.ProgramHypervisor = Firecracker }), "error: PROGRAM_HYPERVISOR KVM"},
		{"qemu forbidden, no firecracker", noFC, set(func(s *Settings) { s.Hypervisors = []string{Firecracker} }), "error: no hypervisor firecracker binary not in HYPERVISORS"},
		{"nothing at all", noKVMNoQEMU, defaults, "error: no hypervisor no qemu-system-x86_64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hv, err := Decide(tc.host, tc.settings).ForProgram()
			check(t, hv, err, tc.want)
		})
	}
}

func TestInstances(t *testing.T) {
	for _, tc := range []struct {
		name     string
		host     Host
		settings Settings
		asked    string
		want     string
	}{
		{"default qemu", goodHost(), defaults, "", QEMU},
		{"asks firecracker", goodHost(), defaults, Firecracker, Firecracker},
		{"default firecracker", goodHost(), set(func(s *Settings) { s.InstanceDefault = Firecracker }), "", Firecracker},
		{"asks firecracker, no kvm", noKVM, defaults, Firecracker, "error: needs firecracker (the message asks for it) no KVM"},
		{"asks firecracker, forbidden", goodHost(), set(func(s *Settings) { s.Hypervisors = []string{QEMU} }), Firecracker, "error: not in HYPERVISORS"},
		{"default firecracker, not here", here, set(func(s *Settings) { s.InstanceDefault = Firecracker }), "", "error: INSTANCE_DEFAULT_HYPERVISOR=firecracker no firecracker binary"},
		{"asks qemu, none", noQEMU, defaults, QEMU, "error: no qemu-system-x86_64"},
		{"qemu runs on tcg", noKVM, defaults, QEMU, QEMU},
		{"unknown", goodHost(), defaults, "xen", `error: unknown hypervisor "xen"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hv, err := Decide(tc.host, tc.settings).ForInstance(tc.asked)
			check(t, hv, err, tc.want)
		})
	}
}

// check compares a decision with want: a hypervisor, or "error: " and
// words (or phrases joined by single spaces) the error must hold.
func check(t *testing.T, hv string, err error, want string) {
	t.Helper()
	words, isErr := strings.CutPrefix(want, "error: ")
	if !isErr {
		if err != nil || hv != want {
			t.Errorf("got %q, %v; want %s", hv, err, want)
		}
		return
	}
	if err == nil {
		t.Fatalf("got %q, want an error", hv)
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("%v does not wrap ErrUnavailable", err)
	}
	for _, w := range strings.Fields(words) {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
}

func TestQEMUAccelAndDisks(t *testing.T) {
	for _, tc := range []struct {
		name  string
		host  Host
		accel string
		disks storage.RawDiskMethod
	}{
		{"all", goodHost(), "kvm", storage.DeviceMapper},
		{"no dm", with(func(h *Host) { h.DeviceMapper = Probe{Found: "no dm"} }), "kvm", storage.ReflinkCopy},
		{"this machine", here, "tcg", storage.PlainCopy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := Decide(tc.host, defaults)
			if p.Accel != tc.accel || p.RawDisks != tc.disks {
				t.Errorf("accel %s, disks %s; want %s, %s", p.Accel, p.RawDisks, tc.accel, tc.disks)
			}
			if p.RawDisksWhy == "" || p.QEMU.Why == "" {
				t.Errorf("no reasons: %+v", p)
			}
		})
	}
}

func TestProblems(t *testing.T) {
	if p := Decide(goodHost(), defaults); len(p.Problems) != 0 {
		t.Errorf("problems on a good host: %v", p.Problems)
	}
	h := with(func(h *Host) { h.Tun, h.NFTables = Probe{Found: "no tun"}, Probe{Found: "no nft"} })
	if p := Decide(h, defaults); len(p.Problems) != 2 {
		t.Errorf("problems: %v", p.Problems)
	}
}

func TestParseVersion(t *testing.T) {
	for out, want := range map[string]string{
		"Firecracker v1.16.1\n\n":       "v1.16.1",
		"Firecracker v1.16.1-dev\n":     "v1.16.1-dev",
		"firecracker 1.16\n":            "",
		"Jailer v1.16.1\n":              "",
		"Firecracker v1.16.1 extra\n":   "",
		"Firecracker v1.16.1\nmore\n\n": "v1.16.1",
	} {
		if got, ok := parseVersion(out, "Firecracker"); got != want || ok != (want != "") {
			t.Errorf("%q: %q %v", out, got, ok)
		}
	}
	if minor("v1.16.1") != "v1.16" || minor("v1.16.2") != minor("v1.16.1") {
		t.Error("minor")
	}
}

func TestQEMURunsAs(t *testing.T) {
	for runAs, want := range map[string]string{
		"":                  "a uid and gid of its own per VM (1100000 to 1165535)",
		"root":              "root (QEMU_RUNAS=root: for debugging only)",
		"nobody":            "nobody (uid 65534",
		"no-such-user-here": "error: QEMU_RUNAS",
		"0:0":               "error: QEMU_RUNAS uid or gid 0",
	} {
		p := Decide(goodHost(), set(func(s *Settings) { s.QEMURunAs, s.QEMUFirstUID = runAs, 1100000 }))
		if words, isErr := strings.CutPrefix(want, "error: "); isErr {
			_, err := p.ForInstance(QEMU)
			check(t, "", err, want)
			for _, w := range strings.Fields(words) {
				if !strings.Contains(p.QEMU.Why, w) {
					t.Errorf("QEMU_RUNAS=%q: qemu %q does not say %q", runAs, p.QEMU.Why, w)
				}
			}
			continue
		}
		if !p.QEMU.Usable || !strings.HasPrefix(p.QEMURunsAs, want) {
			t.Errorf("QEMU_RUNAS=%q: %q (%s), want %q", runAs, p.QEMURunsAs, p.QEMU.Why, want)
		}
	}
}
