// Package cloudinit writes the NoCloud seed that configures an instance on
// its first boot: its identity (meta-data), its users and SSH keys and the
// growth of its root disk (user-data), and its static network
// (network-config v2), on an ISO 9660 volume labelled cidata.
package cloudinit

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"
	"go.yaml.in/yaml/v3"
)

// Config is what an instance is told on its first boot.
type Config struct {
	// InstanceID must stay the same for the life of the instance: a new one
	// makes cloud-init run its first-boot modules again (new host keys).
	InstanceID     string
	Hostname       string
	AuthorizedKeys []string
	// Internet tells whether the instance can reach package mirrors; without
	// it cloud-init is told not to try.
	Internet bool
	Network  Network
}

// Network is the instance's static network.
type Network struct {
	MAC         net.HardwareAddr // the NIC to configure, matched by address
	Address     netip.Prefix     // e.g. 172.16.4.2/24
	Gateway     netip.Addr
	IPv6        netip.Prefix // optional
	GatewayIPv6 netip.Addr   // optional
	DNS         []netip.Addr
}

// Validate checks the configuration.
func (c Config) Validate() error {
	var errs []error
	if c.InstanceID == "" {
		errs = append(errs, errors.New("instance id is empty"))
	}
	if c.Hostname == "" {
		errs = append(errs, errors.New("hostname is empty"))
	}
	if len(c.Network.MAC) != 6 {
		errs = append(errs, errors.New("network: no NIC MAC address"))
	}
	if !c.Network.Address.IsValid() || !c.Network.Gateway.IsValid() {
		errs = append(errs, errors.New("network: address and gateway are required"))
	}
	return errors.Join(errs...)
}

// MetaData renders meta-data.
func MetaData(c Config) ([]byte, error) {
	return yaml.Marshal(map[string]string{"instance-id": c.InstanceID, "local-hostname": c.Hostname})
}

// UserData renders user-data: the keys of root (the reference's users log
// in as root), no password logins, the root partition and filesystem grown
// to the whole disk, and no package installs without internet.
func UserData(c Config) ([]byte, error) {
	type growpart struct {
		Mode    string   `yaml:"mode"`
		Devices []string `yaml:"devices"`
	}
	ud := struct {
		Hostname          string   `yaml:"hostname"`
		PreserveHostname  bool     `yaml:"preserve_hostname"`
		DisableRoot       bool     `yaml:"disable_root"`
		SSHPwauth         bool     `yaml:"ssh_pwauth"`
		SSHAuthorizedKeys []string `yaml:"ssh_authorized_keys,omitempty"`
		Growpart          growpart `yaml:"growpart"`
		ResizeRootfs      bool     `yaml:"resize_rootfs"`
		PackageUpdate     bool     `yaml:"package_update"`
		PackageUpgrade    bool     `yaml:"package_upgrade"`
	}{
		Hostname:          c.Hostname,
		DisableRoot:       false,
		SSHPwauth:         false,
		SSHAuthorizedKeys: c.AuthorizedKeys,
		Growpart:          growpart{Mode: "auto", Devices: []string{"/"}},
		ResizeRootfs:      true,
		PackageUpdate:     c.Internet,
	}
	body, err := yaml.Marshal(ud)
	if err != nil {
		return nil, err
	}
	return append([]byte("#cloud-config\n"), body...), nil
}

// NetworkConfig renders network-config version 2. The NIC is matched by
// its MAC address, whatever the distribution names it, and renamed eth0.
//
// The default routes are gateway4 and gateway6, not routes to 0.0.0.0/0:
// every renderer cloud-init may pick makes a gateway its own way
// (networkd Gateway=, ifupdown's gateway line, sysconfig GATEWAY=,
// netplan as written), whereas its ifupdown renderer turns routes into
// "post-up route add ... || true", which does nothing on an image without
// net-tools: the VM would come up with no default route, silently.
func NetworkConfig(c Config) ([]byte, error) {
	type nameservers struct {
		Addresses []string `yaml:"addresses"`
	}
	type ethernet struct {
		Match       map[string]string `yaml:"match"`
		SetName     string            `yaml:"set-name"`
		Addresses   []string          `yaml:"addresses"`
		Gateway4    string            `yaml:"gateway4"`
		Gateway6    string            `yaml:"gateway6,omitempty"`
		Nameservers *nameservers      `yaml:"nameservers,omitempty"`
	}
	n := c.Network
	eth := ethernet{
		Match:     map[string]string{"macaddress": n.MAC.String()},
		SetName:   "eth0",
		Addresses: []string{n.Address.String()},
		Gateway4:  n.Gateway.String(),
	}
	if n.IPv6.IsValid() {
		eth.Addresses = append(eth.Addresses, n.IPv6.String())
		if n.GatewayIPv6.IsValid() {
			eth.Gateway6 = n.GatewayIPv6.String()
		}
	}
	if len(n.DNS) > 0 {
		ns := &nameservers{}
		for _, a := range n.DNS {
			ns.Addresses = append(ns.Addresses, a.String())
		}
		eth.Nameservers = ns
	}
	return yaml.Marshal(map[string]any{"version": 2, "ethernets": map[string]ethernet{"eth0": eth}})
}

// iso9660BlockSize is ISO 9660's logical block size.
const iso9660BlockSize = 2048

// WriteSeed writes the NoCloud seed for c to path, an ISO 9660 image with
// Rock Ridge and Joliet names (without Rock Ridge, cloud-init would see
// USER_DAT.;1), labelled cidata. It replaces path atomically.
func WriteSeed(path string, c Config) error {
	if err := c.Validate(); err != nil {
		return fmt.Errorf("cloud-init seed: %w", err)
	}
	files := map[string]func(Config) ([]byte, error){"meta-data": MetaData, "user-data": UserData, "network-config": NetworkConfig}
	contents := map[string][]byte{}
	size := int64(0)
	for name, render := range files {
		b, err := render(c)
		if err != nil {
			return fmt.Errorf("cloud-init %s: %w", name, err)
		}
		contents[name] = b
		size += int64(len(b))
	}
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	workDir, err := os.MkdirTemp(filepath.Dir(path), "cidata-*.tmp")
	if err != nil {
		return fmt.Errorf("cloud-init seed: %w", err)
	}
	defer os.RemoveAll(workDir)
	d, err := diskfs.Create(tmp, size+1<<20, diskfs.SectorSize(iso9660BlockSize))
	if err != nil {
		return fmt.Errorf("create seed image %s: %w", tmp, err)
	}
	defer os.Remove(tmp)
	fs, err := d.CreateFilesystem(disk.FilesystemSpec{Partition: 0, FSType: filesystem.TypeISO9660, VolumeLabel: "cidata", WorkDir: workDir})
	if err != nil {
		d.Close()
		return fmt.Errorf("create seed filesystem: %w", err)
	}
	for _, name := range []string{"meta-data", "user-data", "network-config"} {
		f, err := fs.OpenFile(name, os.O_CREATE|os.O_RDWR)
		if err == nil {
			_, err = f.Write(contents[name])
		}
		if err != nil {
			d.Close()
			return fmt.Errorf("write %s to the seed: %w", name, err)
		}
	}
	iso, ok := fs.(*iso9660.FileSystem)
	if !ok {
		d.Close()
		return errors.New("seed filesystem is not ISO 9660")
	}
	if err := iso.Finalize(iso9660.FinalizeOptions{RockRidge: true, Joliet: true, VolumeIdentifier: "cidata"}); err != nil {
		d.Close()
		return fmt.Errorf("finalize seed: %w", err)
	}
	if err := d.Close(); err != nil {
		return fmt.Errorf("close seed: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("install seed %s: %w", path, err)
	}
	return nil
}
