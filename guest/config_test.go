package guest

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func validConfig() Config {
	return Config{
		Version:  ConfigVersion,
		Hostname: "abcdefgh",
		Network: &Network{
			Address:  netip.MustParsePrefix("172.16.4.2/24"),
			Gateway:  netip.MustParseAddr("172.16.4.1"),
			Address6: netip.MustParsePrefix("fc00:1:2:3::2/124"),
			Gateway6: netip.MustParseAddr("fc00:1:2:3::1"),
			MTU:      1500,
			DNS:      []netip.Addr{netip.MustParseAddr("9.9.9.9")},
		},
		Workload: Workload{Interface: InterfaceBinary, Entrypoint: "run.sh", Args: []string{"-v"}, Variables: map[string]string{"A": "1"}},
		Drives: []Drive{
			{Role: RoleRuntime, Format: FormatSquashfs, Mount: "/", ReadOnly: true},
			{Role: RoleCode, Format: FormatZip, Mount: "/opt/code", Size: 1234},
			{Role: RoleVolume, Format: FormatExt4, Mount: "/mnt/data", Persistent: true, Name: "data"},
		},
		Tmpfs: []Tmpfs{{Mount: "/scratch", SizeMiB: 10}},
	}
}

func TestConfigDriveRoundTrip(t *testing.T) {
	cfg := validConfig()
	path := filepath.Join(t.TempDir(), "config.img")
	if err := WriteConfigDrive(path, cfg); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(img)%4096 != 0 {
		t.Errorf("image is %d bytes, not a multiple of 4096", len(img))
	}
	got, err := ReadConfigDrive(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, cfg) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, cfg)
	}

	corrupt := bytes.Clone(img)
	corrupt[600] ^= 1
	if _, err := ReadConfigDrive(bytes.NewReader(corrupt)); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("corrupt payload: %v", err)
	}
	if _, err := ReadConfigDrive(bytes.NewReader(make([]byte, 4096))); err != ErrNotConfigDrive {
		t.Errorf("blank drive: %v", err)
	}
}

func TestWriteConfigDriveRejectsInvalid(t *testing.T) {
	cfg := validConfig()
	cfg.Drives = cfg.Drives[1:]
	err := WriteConfigDrive(filepath.Join(t.TempDir(), "c.img"), cfg)
	if err == nil || !strings.Contains(err.Error(), "exactly one runtime drive") {
		t.Errorf("got %v", err)
	}
}

func TestValidate(t *testing.T) {
	cases := []struct {
		name   string
		change func(*Config)
		want   string
	}{
		{"ok", func(*Config) {}, ""},
		{"no network", func(c *Config) { c.Network = nil }, ""},
		{"version", func(c *Config) { c.Version = 9 }, "version"},
		{"hostname", func(c *Config) { c.Hostname = "a b" }, "hostname"},
		{"v6 as v4", func(c *Config) { c.Network.Address = netip.MustParsePrefix("fc00::2/64") }, "network.address"},
		{"mtu", func(c *Config) { c.Network.MTU = 10 }, "network.mtu"},
		{"interface", func(c *Config) { c.Workload.Interface = "wsgi" }, "workload.interface"},
		{"escaping entrypoint", func(c *Config) { c.Workload.Entrypoint = "../bin/sh" }, "workload.entrypoint"},
		{"relative mount", func(c *Config) { c.Drives[2].Mount = "mnt" }, "drives[2].mount"},
		{"twice mounted", func(c *Config) { c.Drives[2].Mount = "/opt/code" }, "already mounted"},
		{"zip without size", func(c *Config) { c.Drives[1].Size = 0 }, "drives[1].size"},
		{"volume at root", func(c *Config) { c.Drives[2].Mount = "/" }, "only the runtime"},
		{"tmpfs size", func(c *Config) { c.Tmpfs[0].SizeMiB = 0 }, "tmpfs[0].size_mib"},
		{"halt", func(c *Config) { c.Halt = "explode" }, "halt"},
		{"root user", func(c *Config) { c.Workload.User = "0" }, "workload.user"},
		{"named user", func(c *Config) { c.Workload.User = "aleph" }, "workload.user"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := validConfig()
			tc.change(&c)
			err := c.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error about %s", err, tc.want)
			}
		})
	}
}

func TestDeviceName(t *testing.T) {
	for i, want := range map[int]string{0: "vdb", 1: "vdc", 24: "vdz", 25: "vdaa", 26: "vdab", 50: "vdaz", 51: "vdba"} {
		if got := DeviceName(i); got != want {
			t.Errorf("DeviceName(%d) = %s, want %s", i, got, want)
		}
	}
}

func TestPayloadDrive(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "code.zip")
	os.WriteFile(src, []byte("PK\x05\x06 not quite a zip"), 0o644)
	size, err := PayloadDrive(src, filepath.Join(dir, "drive"))
	if err != nil || size != 20 {
		t.Fatalf("size %d, %v", size, err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "drive"))
	if len(b) != SectorSize || string(b[:20]) != "PK\x05\x06 not quite a zip" || b[20] != 0 {
		t.Errorf("drive of %d bytes", len(b))
	}
	aligned := filepath.Join(dir, "aligned")
	os.WriteFile(aligned, make([]byte, 2*SectorSize), 0o644)
	if size, err := PayloadDrive(aligned, filepath.Join(dir, "linked")); err != nil || size != 2*SectorSize {
		t.Errorf("aligned: %d %v", size, err)
	}
	a, _ := os.Stat(aligned)
	l, _ := os.Stat(filepath.Join(dir, "linked"))
	if !os.SameFile(a, l) {
		t.Error("an aligned payload was copied, not linked")
	}
}

func TestParseWorkloadUser(t *testing.T) {
	cases := []struct {
		spec     string
		uid, gid int
		err      string
	}{
		{"", WorkloadUID, WorkloadGID, ""},
		{"2000", 2000, 2000, ""},
		{"2000:33", 2000, 33, ""},
		{"4294967293", 4294967293, 4294967293, ""},
		{"0", 0, 0, "root"},
		{"0:1000", 0, 0, "root"},
		{"1000:0", 0, 0, "root"},
		{"root", 0, 0, "names are not looked up"},
		{"aleph", 0, 0, "names are not looked up"},
		{"aleph:1000", 0, 0, "names are not looked up"},
		{"-1", 0, 0, "want a number"},
		{"1000:", 0, 0, "want a number"},
		{"1:2:3", 0, 0, "want a number"},
		{"4294967295", 0, 0, "past"},
		{"99999999999", 0, 0, "want a number"},
		{" 1000", 0, 0, "want a number"},
	}
	for _, tc := range cases {
		uid, gid, err := ParseWorkloadUser(tc.spec)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: got %d:%d, %v; want an error about %q", tc.spec, uid, gid, err, tc.err)
			}
			continue
		}
		if err != nil || uid != tc.uid || gid != tc.gid {
			t.Errorf("%q: got %d:%d, %v; want %d:%d", tc.spec, uid, gid, err, tc.uid, tc.gid)
		}
	}
}
