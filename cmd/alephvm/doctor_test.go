package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/hostcheck"
)

// TestDoctor runs the real probes on this host: whatever it has, every
// probe is reported and the plan is said.
func TestDoctor(t *testing.T) {
	code, out, errOut := runCLI(t, nil, "doctor")
	for _, want := range []string{"kvm", "firecracker", "jailer", "qemu", "device-mapper", "reflink", "nftables", "tun", "cgroups", "vsock", "firmware", "tools", "UEFI disk images",
		"programs run under", "instances that name no hypervisor run under", "root disks are"} {
		if !strings.Contains(out, want) {
			t.Errorf("doctor does not mention %q", want)
		}
	}
	if code != 0 && !strings.Contains(errOut, "cannot run VMs") {
		t.Errorf("exit %d without saying why: %s", code, errOut)
	}
	t.Logf("exit %d\n%s%s", code, out, errOut)
}

func TestDoctorFailsWhenNoVMCanRun(t *testing.T) {
	var h hostcheck.Host // nothing found
	p := hostcheck.Decide(h, hostcheck.Settings{ProgramHypervisor: "auto", InstanceDefault: "qemu", UseJailer: true})
	var out bytes.Buffer
	err := writeDoctor(&out, h, p)
	if err == nil || !strings.Contains(err.Error(), "no hypervisor runs here") || !strings.Contains(err.Error(), "tun") {
		t.Errorf("error %v", err)
	}
	if !strings.Contains(out.String(), "UEFI disk images (debian-12) cannot boot") {
		t.Errorf("no word on UEFI firmware:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "instances that ask for firecracker are refused") {
		t.Errorf("output:\n%s", out.String())
	}
}
