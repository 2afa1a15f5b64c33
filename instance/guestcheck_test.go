package instance

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/storage"
)

// TestGuestCheck looks into small root filesystems, bare, in an MBR
// partition, in a GPT partition and in a compressed qcow2, for cloud-init and its NoCloud
// datasource.
func TestGuestCheck(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "sfdisk", "qemu-img")
	const noCloud = "datasource_list: [ NoCloud, None ]\n"
	tests := []struct {
		name    string
		files   map[string]string
		checked bool
		refused string
	}{
		{"debian defaults", map[string]string{"etc/os-release": "ID=debian\n", "usr/bin/cloud-init": "", "etc/cloud/cloud.cfg": "users: [default]\n"}, true, ""},
		{"nocloud listed", map[string]string{"etc/os-release": "", "usr/bin/cloud-init": "", "etc/cloud/cloud.cfg.d/90-x.cfg": noCloud}, true, ""},
		{"no cloud-init", map[string]string{"etc/os-release": "ID=debian\n"}, true, "no cloud-init"},
		{"disabled", map[string]string{"etc/os-release": "", "usr/bin/cloud-init": "", "etc/cloud/cloud-init.disabled": ""}, true, "disabled"},
		{"other datasources", map[string]string{"usr/lib/os-release": "", "usr/bin/cloud-init": "",
			"etc/cloud/cloud.cfg.d/10-a.cfg": noCloud, "etc/cloud/cloud.cfg.d/99-ec2.cfg": "datasource_list: [Ec2]\n"}, true, "[Ec2]"},
		{"later file wins", map[string]string{"etc/os-release": "", "usr/bin/cloud-init": "",
			"etc/cloud/cloud.cfg": "datasource_list: [Ec2]\n", "etc/cloud/cloud.cfg.d/90-a.cfg": noCloud}, true, ""},
		{"not a root filesystem", map[string]string{"vmlinuz": ""}, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tree := filepath.Join(dir, "tree")
			for name, body := range tt.files {
				p := filepath.Join(tree, name)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			os.MkdirAll(filepath.Join(tree, "etc/cloud/cloud.cfg.d"), 0o755)
			bare := filepath.Join(dir, "bare.ext4")
			testenv.Cmd(t, "mkfs.ext4", "-q", "-F", "-d", tree, bare, "16M")
			disk := filepath.Join(dir, "disk.raw")
			testenv.Cmd(t, "truncate", "-s", "24M", disk)
			testenv.Cmd(t, "sh", "-c", "echo 'start=2048, type=83, bootable' | sfdisk -q --label dos "+disk)
			testenv.Cmd(t, "mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", tree, disk, "16M")
			gpt := filepath.Join(dir, "gpt.raw")
			testenv.Cmd(t, "truncate", "-s", "24M", gpt)
			testenv.Cmd(t, "sh", "-c", "printf 'label: gpt\\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\\nstart=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\\n' | sfdisk -q "+gpt)
			testenv.Cmd(t, "mkfs.ext4", "-q", "-F", "-E", "offset=2097152", "-d", tree, gpt, "16M")
			qcow := filepath.Join(dir, "disk.qcow2")
			testenv.Cmd(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", disk, qcow)
			for _, c := range []struct {
				img  storage.Image
				form baseForm
			}{
				{storage.Image{Path: bare, Format: storage.FormatRaw}, formExt4},
				{storage.Image{Path: disk, Format: storage.FormatRaw}, formDisk},
				{storage.Image{Path: gpt, Format: storage.FormatRaw}, formDisk},
				{storage.Image{Path: qcow, Format: storage.FormatQCOW2}, formDisk},
			} {
				ctx := context.Background()
				info, err := storage.Inspect(ctx, c.img)
				if err != nil {
					t.Fatal(err)
				}
				head, err := readHead(ctx, []storage.Image{c.img}, dir)
				if err != nil {
					t.Fatal(err)
				}
				checked, err := guestCheck(ctx, []storage.ImageInfo{info}, head, c.form, dir)
				if checked != tt.checked {
					t.Errorf("%s: checked %v, want %v", filepath.Base(c.img.Path), checked, tt.checked)
				}
				var e *execution.Error
				switch {
				case tt.refused == "" && err != nil:
					t.Errorf("%s: %v", filepath.Base(c.img.Path), err)
				case tt.refused != "" && (!errors.As(err, &e) || e.Status != 400 || !strings.Contains(e.Msg, tt.refused)):
					t.Errorf("%s: got %v, want a 400 saying %q", filepath.Base(c.img.Path), err, tt.refused)
				}
			}
		})
	}
}
