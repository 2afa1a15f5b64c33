package cloudinit

import (
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

func TestMain(m *testing.M) {
	flag.Parse()
	testassets.Prepare(false)
	testenv.RunIsolated(m)
}

// TestRenderersMakeTheDefaultRoute hands the network-config the node
// writes to the cloud-init of the test base image (Debian's, without
// net-tools), run in a chroot, and reads what each renderer cloud-init may
// pick makes of it: the address and the default routes, by the renderer's
// own means. (cloud-init's ifupdown renderer turns a route to 0.0.0.0/0
// into "post-up route add ... || true", which needs net-tools and fails
// silently without them.)
func TestRenderersMakeTheDefaultRoute(t *testing.T) {
	testenv.RequireTools(t, "mount", "umount", "chroot")
	base := testassets.BaseImage(t)
	root := t.TempDir()
	testenv.Cmd(t, "mount", "-o", "loop,ro", base.Ext4, root)
	t.Cleanup(func() { exec.Command("umount", "-l", root).Run() })
	testenv.Cmd(t, "mount", "-t", "tmpfs", "tmpfs", filepath.Join(root, "tmp"))
	t.Cleanup(func() { exec.Command("umount", filepath.Join(root, "tmp")).Run() })
	if _, err := os.Stat(filepath.Join(root, "usr", "bin", "cloud-init")); err != nil {
		t.Fatalf("the base image has no cloud-init: %v", err)
	}
	nc, err := NetworkConfig(sample())
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "tmp", "network-config"), nc, 0o644)
	for _, tc := range []struct {
		renderer, distro, file string
		want                   []string
	}{
		{"eni", "debian", "etc/network/interfaces.d/50-cloud-init", []string{"address 172.16.4.2/24", "gateway 172.16.4.1", "gateway fc00:1:2:3:3:9a8b:7c6d:5e40"}},
		{"networkd", "debian", "etc/systemd/network/10-cloud-init-eth0.network", []string{"Address=172.16.4.2/24", "Gateway=172.16.4.1", "Gateway=fc00:1:2:3:3:9a8b:7c6d:5e40", "MACAddress=06:00:ac:10:04:02"}},
		{"sysconfig", "rhel", "etc/sysconfig/network-scripts/ifcfg-eth0", []string{"IPADDR=172.16.4.2", "GATEWAY=172.16.4.1", "IPV6_DEFAULTGW=fc00:1:2:3:3:9a8b:7c6d:5e40", "HWADDR=06:00:ac:10:04:02"}},
		{"netplan", "ubuntu", "etc/netplan/50-cloud-init.yaml", []string{"172.16.4.2/24", "gateway4: 172.16.4.1", "gateway6: fc00:1:2:3:3:9a8b:7c6d:5e40"}},
	} {
		out := "/tmp/out-" + tc.renderer
		cmd := exec.Command("chroot", root, "cloud-init", "devel", "net-convert", "-p", "/tmp/network-config", "-k", "yaml", "-D", tc.distro, "-d", out, "-O", tc.renderer)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", tc.renderer, err, b)
			continue
		}
		got, err := os.ReadFile(filepath.Join(root, out, tc.file))
		if err != nil {
			t.Errorf("%s: %v", tc.renderer, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(string(got), w) {
				t.Errorf("%s renders no %q:\n%s", tc.renderer, w, got)
			}
		}
		if strings.Contains(string(got), "route add") {
			t.Errorf("%s needs net-tools for a route:\n%s", tc.renderer, got)
		}
	}
}
