package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/config"
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

// TestDoctorNodeFiles says what is missing of the program assets and the
// base image, and how to build it.
func TestDoctorNodeFiles(t *testing.T) {
	cache := t.TempDir()
	c := config.Default()
	c.CacheRoot = cache
	var out bytes.Buffer
	writeNodeFiles(&out, c)
	for _, want := range []string{`program assets  no`, `"alephvm assets build"`, `base image      no`, `"alephvm base-image build"`, filepath.Join(cache, "base-image")} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no %q in:\n%s", want, out.String())
		}
	}
	// A manifest that is not JSON is reported, not fatal.
	os.MkdirAll(c.Assets(), 0o755)
	os.WriteFile(filepath.Join(c.Assets(), "manifest.json"), []byte("{"), 0o644)
	out.Reset()
	writeNodeFiles(&out, c)
	if !strings.Contains(out.String(), "manifest") || !strings.Contains(out.String(), `"alephvm assets build"`) {
		t.Errorf("broken manifest:\n%s", out.String())
	}
	c.ProgramKernel, c.ProgramInitrd = "/k", "/i"
	out.Reset()
	writeNodeFiles(&out, c)
	if !strings.Contains(out.String(), "program kernel  set") {
		t.Errorf("kernel given by the settings:\n%s", out.String())
	}
}
