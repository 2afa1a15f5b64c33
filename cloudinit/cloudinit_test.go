package cloudinit

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func sample() Config {
	mac, _ := net.ParseMAC("06:00:ac:10:04:02")
	return Config{
		InstanceID:     "iid-alephvm-9a8b7c6d5e4f",
		Hostname:       "vm-9a8b7c6d",
		AuthorizedKeys: []string{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey user@host"},
		Network: Network{
			MAC: mac, Address: netip.MustParsePrefix("172.16.4.2/24"), Gateway: netip.MustParseAddr("172.16.4.1"),
			IPv6: netip.MustParsePrefix("fc00:1:2:3:3:9a8b:7c6d:5e41/124"), GatewayIPv6: netip.MustParseAddr("fc00:1:2:3:3:9a8b:7c6d:5e40"),
			DNS: []netip.Addr{netip.MustParseAddr("9.9.9.9")},
		},
	}
}

func TestRenderGolden(t *testing.T) {
	for name, render := range map[string]func(Config) ([]byte, error){"meta-data": MetaData, "user-data": UserData, "network-config": NetworkConfig} {
		got, err := render(sample())
		if err != nil {
			t.Fatal(err)
		}
		testenv.Golden(t, filepath.Join("testdata", name), got)
	}
}

func TestSeedImage(t *testing.T) {
	testenv.RequireTools(t, "isoinfo", "blkid")
	path := filepath.Join(t.TempDir(), "cidata.iso")
	if err := WriteSeed(path, sample()); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("blkid", "-o", "export", path).Output(); !strings.Contains(string(out), "LABEL=cidata") || !strings.Contains(string(out), "TYPE=iso9660") {
		t.Errorf("blkid: %s", out)
	}
	for _, ext := range []string{"-R", "-J"} {
		for _, name := range []string{"meta-data", "user-data", "network-config"} {
			out, err := exec.Command("isoinfo", "-i", path, ext, "-x", "/"+name).Output()
			want, _ := os.ReadFile(filepath.Join("testdata", name))
			if err != nil || string(out) != string(want) {
				t.Errorf("isoinfo %s %s: %v\n%s", ext, name, err, out)
			}
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("left behind: %v", entries)
	}
	bad := sample()
	bad.Network.MAC = nil
	if err := WriteSeed(path, bad); err == nil {
		t.Error("seed without a MAC accepted")
	}
}
