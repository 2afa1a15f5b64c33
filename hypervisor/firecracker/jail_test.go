package firecracker

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
)

func TestMain(m *testing.M) { testenv.RunIsolated(m) }

// TestJailPlanGolden pins the layout of a program's jail and the jailer's
// command line for it.
func TestJailPlanGolden(t *testing.T) {
	spec := hypervisor.Spec{
		Name: "prog-1f2e3d", Dir: "/run/alephvm/vms/1f2e3d", VCPUs: 2, MemoryMiB: 512,
		Boot: hypervisor.Boot{Kernel: "/var/cache/alephvm/assets/vmlinux", Initrd: "/var/cache/alephvm/assets/initramfs.cpio.gz"},
		Drives: []hypervisor.Drive{
			{Path: "/run/alephvm/vms/1f2e3d/config.img", ReadOnly: true},
			{Path: "/var/cache/alephvm/store/runtime.squashfs", ReadOnly: true},
			{Path: "/var/lib/alephvm/volumes/1f2e3d/data.ext4"},
			{Path: "/dev/mapper/1f2e3d_rootfs"},
		},
		Control: true, ControlPort: "org.alephvm.control",
	}
	j, paths, err := PlanJail(spec, "/var/lib/alephvm/jail", "firecracker", 1000007, 1000007)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "jail %s in %s, uid %d gid %d\n", j.ID, j.Dir, j.UID, j.GID)
	for _, d := range j.Dirs {
		fmt.Fprintf(&b, "dir  %-18s owned by the jail, mode %o\n", d.Path, d.Mode)
	}
	for _, e := range j.Entries {
		how := "read-only, owner kept"
		if e.Writable {
			how = "writable, owned by the jail"
		}
		fmt.Fprintf(&b, "file %-18s <- %s (%s)\n", e.Path, e.Host, how)
	}
	fmt.Fprintf(&b, "config paths: kernel %s, drive3 %s, vsock %s, log %s\n",
		paths.Path(spec.Boot.Kernel), paths.Path(spec.Drives[3].Path), paths.VsockSocket, paths.LogFile)
	for _, v := range []int{1, 2} {
		fmt.Fprintf(&b, "jailer (cgroup v%d): %s\n", v, strings.Join(JailerArgs(j, "/usr/local/bin/firecracker", "/var/lib/alephvm/jail", v, spec.VCPUs, spec.MemoryMiB), " "))
	}
	testenv.Golden(t, filepath.Join("testdata", "jail-program.txt"), []byte(b.String()))
}

func TestJailPlanRefusals(t *testing.T) {
	spec := hypervisor.Spec{Name: "prog.1", Dir: "/run/x", VCPUs: 1, MemoryMiB: 128, Boot: hypervisor.Boot{Kernel: "/k"}}
	if _, _, err := PlanJail(spec, "/srv/jailer", "firecracker", 1, 1); err == nil {
		t.Error("a dot in the jail id passed")
	}
	spec.Name = "ok"
	if _, _, err := PlanJail(spec, "/"+strings.Repeat("x", 80), "firecracker", 1, 1); err == nil || !strings.Contains(err.Error(), "socket path") {
		t.Errorf("a socket path over 107 bytes: %v", err)
	}
}

// jailFixture is a VM spec over real files: read-only and writable ones on
// the jail's filesystem, a read-only one on another filesystem (a tmpfs)
// and a loop device standing for a device-mapper snapshot.
type jailFixture struct {
	spec hypervisor.Spec
	base string
	loop string
}

func newJailFixture(t *testing.T) jailFixture {
	t.Helper()
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "losetup", "mount")
	dir := t.TempDir()
	write := func(path string, mode fs.FileMode) string {
		if err := os.WriteFile(path, []byte("content of "+filepath.Base(path)), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(path, mode)
		return path
	}
	other := filepath.Join(dir, "other")
	os.Mkdir(other, 0o755)
	testenv.Cmd(t, "mount", "-t", "tmpfs", "tmpfs", other)
	t.Cleanup(func() { exec.Command("umount", "-l", other).Run() })
	img := filepath.Join(dir, "snapshot.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	loop := strings.TrimSpace(testenv.Cmd(t, "losetup", "--find", "--show", img))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })

	vmDir := filepath.Join(dir, "vm")
	os.Mkdir(vmDir, 0o700)
	spec := hypervisor.Spec{
		Name: "inst-1", Dir: vmDir, VCPUs: 1, MemoryMiB: 128,
		Boot: hypervisor.Boot{Kernel: write(filepath.Join(dir, "vmlinux"), 0o644), Initrd: write(filepath.Join(dir, "initrd"), 0o444)},
		Drives: []hypervisor.Drive{
			{Path: loop},
			{Path: write(filepath.Join(dir, "runtime.squashfs"), 0o444), ReadOnly: true},
			{Path: write(filepath.Join(other, "code.squashfs"), 0o444), ReadOnly: true},
			{Path: write(filepath.Join(dir, "data.ext4"), 0o600)},
		},
		Control: true, ControlPort: "org.alephvm.control",
	}
	cfg, err := BuildConfig(spec, Paths{})
	if err != nil {
		t.Fatal(err)
	}
	if err := writeRuntimeFiles(vmDir, cfg); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "jail")
	// Whatever happens to the test, no bind mount outlives it.
	t.Cleanup(func() {
		mounts, _ := mountsUnder(base)
		for _, m := range mounts {
			_ = syscall.Unmount(m, syscall.MNT_DETACH)
		}
	})
	return jailFixture{spec: spec, base: base, loop: loop}
}

func stat(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// TestJailLayout makes a jail as root and checks what is in it: the same
// inodes as the host's files (nothing copied), owners and modes, the one
// device node, and that removing it leaves nothing and gives the files
// back.
func TestJailLayout(t *testing.T) {
	fx := newJailFixture(t)
	const uid = 1000042
	j, _, err := PlanJail(fx.spec, fx.base, "firecracker", uid, uid)
	if err != nil {
		t.Fatal(err)
	}
	// A leftover of an earlier run is replaced.
	os.MkdirAll(j.HostPath("/run"), 0o755)
	os.WriteFile(j.HostPath("/firecracker.pid"), []byte("1"), 0o644)
	if err := j.Create(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(j.HostPath("/firecracker.pid")); err == nil {
		t.Error("the leftover pidfile is still there")
	}
	for _, d := range j.Dirs {
		st := stat(t, j.HostPath(d.Path))
		if st.Uid != uid || st.Gid != uid || fs.FileMode(st.Mode&0o7777) != d.Mode {
			t.Errorf("%s: owner %d:%d mode %o", d.Path, st.Uid, st.Gid, st.Mode&0o7777)
		}
	}
	mounts, _ := mountsUnder(j.Dir)
	for _, e := range j.Entries {
		host, in := stat(t, e.Host), stat(t, j.HostPath(e.Path))
		switch {
		case e.Host == fx.loop:
			if in.Mode&syscall.S_IFMT != syscall.S_IFBLK || in.Rdev != host.Rdev {
				t.Errorf("%s: not the node of %s (mode %o, rdev %x)", e.Path, fx.loop, in.Mode, in.Rdev)
			}
			if in.Uid != uid || in.Gid != uid || in.Mode&0o7777 != 0o600 {
				t.Errorf("%s: owner %d:%d mode %o", e.Path, in.Uid, in.Gid, in.Mode&0o7777)
			}
			continue
		case in.Dev != host.Dev || in.Ino != host.Ino:
			t.Errorf("%s: inode %d:%d, host file %d:%d: a copy", e.Path, in.Dev, in.Ino, host.Dev, host.Ino)
		}
		crossFS := strings.Contains(e.Host, "/other/")
		if isMount := slices.Contains(mounts, j.HostPath(e.Path)); isMount != crossFS {
			t.Errorf("%s: bind-mounted %v, want %v", e.Path, isMount, crossFS)
		}
		if !crossFS && host.Nlink != 2 {
			t.Errorf("%s: %d links, want 2", e.Path, host.Nlink)
		}
		if e.Writable && (host.Uid != uid || host.Gid != uid) {
			t.Errorf("%s: writable but owned by %d:%d", e.Path, host.Uid, host.Gid)
		}
		if !e.Writable && host.Uid != 0 {
			t.Errorf("%s: read-only but handed to %d", e.Path, host.Uid)
		}
	}
	// The bind mount of a read-only file is read-only, even for root.
	if f, err := os.OpenFile(j.HostPath("/drive2"), os.O_WRONLY, 0); err == nil {
		f.Close()
		t.Error("the read-only bind mount is writable")
	}
	// The node is the device: written in the jail, read on the host.
	if err := os.WriteFile(j.HostPath("/drive0"), []byte("through the jail"), 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(fx.loop); !bytes.HasPrefix(got, []byte("through the jail")) {
		t.Errorf("the loop device reads %q", got[:16])
	}

	if err := j.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(j.Dir); !os.IsNotExist(err) {
		t.Errorf("jail directory after remove: %v", err)
	}
	if mounts, _ := mountsUnder(fx.base); len(mounts) > 0 {
		t.Errorf("mounts left: %v", mounts)
	}
	for _, e := range j.Entries {
		st := stat(t, e.Host)
		if st.Uid != 0 || (st.Mode&syscall.S_IFMT == syscall.S_IFREG && st.Nlink != 1) {
			t.Errorf("%s after remove: owner %d, %d links", e.Host, st.Uid, st.Nlink)
		}
	}
	if got, _ := os.ReadFile(fx.spec.Drives[3].Path); string(got) != "content of data.ext4" {
		t.Errorf("writable drive after remove: %q", got)
	}
	if err := j.Remove(); err != nil {
		t.Errorf("removing twice: %v", err)
	}
}

func TestJailRefusesUnreadableFile(t *testing.T) {
	fx := newJailFixture(t)
	secret := fx.spec.Drives[1].Path
	os.Chmod(secret, 0o400)
	j, _, _ := PlanJail(fx.spec, fx.base, "firecracker", 1000043, 1000043)
	err := j.Create()
	if err == nil || !strings.Contains(err.Error(), "readable by others") {
		t.Fatalf("create with a 0400 read-only drive: %v", err)
	}
	if _, err := os.Stat(j.Dir); !os.IsNotExist(err) {
		t.Errorf("a failed create left %s", j.Dir)
	}
	if mounts, _ := mountsUnder(fx.base); len(mounts) > 0 {
		t.Errorf("a failed create left mounts: %v", mounts)
	}
}

// SocketPaths says where Start makes a VM's sockets.
func TestSocketPaths(t *testing.T) {
	spec := hypervisor.Spec{Name: "inst-0123456789ab", Dir: "/run/vms/i-x", Boot: hypervisor.Boot{Kernel: "/k"}}
	j, _, err := PlanJail(spec, "/srv/jailer", "firecracker", 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	api, vsock := SocketPaths(true, "/srv/jailer", "/usr/bin/firecracker", spec.Dir, spec.Name)
	if api != j.HostPath(jailAPI) || vsock != j.HostPath(jailVsock) {
		t.Errorf("jailed: %s %s", api, vsock)
	}
	api, vsock = SocketPaths(false, "/srv/jailer", "/usr/bin/firecracker", spec.Dir, spec.Name)
	if api != "/run/vms/i-x/firecracker.sock" || vsock != "/run/vms/i-x/v.sock" {
		t.Errorf("unjailed: %s %s", api, vsock)
	}
}
