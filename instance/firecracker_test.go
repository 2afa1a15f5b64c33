package instance

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hostcheck"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/firecracker"
	"github.com/alephvm/alephvm/internal/backends"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// withFakeFirecracker gives the rig a jailed Firecracker backend played by
// internal/fakefirecracker (which opens every file as Firecracker would,
// as the jail's uid, and serves the API), and the node's choice of
// hypervisors for a host where both run.
func (r *rig) withFakeFirecracker() {
	fc, jailer := testenv.FakeFirecracker(r.t)
	driver, err := firecracker.New(firecracker.Options{Firecracker: fc, Jailer: jailer, UseJailer: true,
		JailerBase: filepath.Join(r.dir, "jail"), FirstUID: 1000300}, r.log)
	if err != nil {
		r.t.Fatal(err)
	}
	r.hvs[hypervisor.Firecracker] = backends.FirecrackerBackend(driver)
	r.choose = hostcheck.Decide(everything(), hostcheck.Settings{ProgramHypervisor: "auto", InstanceDefault: hypervisor.QEMU, UseJailer: true})
	// The fake boots nothing: these stand for the base image's kernel.
	for _, f := range []string{"vmlinuz", "vmlinux", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(r.dir, f), []byte(f), 0o644); err != nil {
			r.t.Fatal(err)
		}
	}
	r.boot = execution.Kernel{Kernel: filepath.Join(r.dir, "vmlinuz"), Vmlinux: filepath.Join(r.dir, "vmlinux"),
		Initrd: filepath.Join(r.dir, "initrd.img"), Cmdline: "root=LABEL=rootfs ro"}
}

func everything() hostcheck.Host {
	ok := hostcheck.Probe{OK: true}
	return hostcheck.Host{KVM: ok, Firecracker: ok, Jailer: ok, QEMU: ok, DeviceMapper: ok, Reflink: ok, NFTables: ok, Tun: ok, Cgroups: ok, Vsock: ok}
}

// ext4Instance stores a bare ext4 base image of 64 MiB and an INSTANCE
// message over it that asks for hypervisor.
func (r *rig) ext4Instance(hypervisor string, sizeMiB int) message.ItemHash {
	base := filepath.Join(r.dir, "base.ext4")
	testenv.Cmd(r.t, "mkfs.ext4", "-q", "-F", "-L", "rootfs", base, "64M")
	added, err := r.st.AddFile(context.Background(), base)
	if err != nil {
		r.t.Fatal(err)
	}
	return r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000000, "allow_amend": false,
		"authorized_keys": []string{"ssh-ed25519 AAAA owner"},
		"environment":     map[string]any{"internet": false, "hypervisor": hypervisor},
		"resources":       map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"rootfs":          map[string]any{"parent": map[string]any{"ref": string(added.Ref), "use_latest": false}, "persistence": "host", "size_mib": sizeMiB},
		"volumes":         []any{map[string]any{"name": "data", "persistence": "host", "size_mib": 16, "mount": "/data"}},
	})
}

// TestFirecrackerInstance runs an instance through the Firecracker
// backend end to end, with the fake in place of Firecracker: the raw root
// disk over the base, the drives and kernel Firecracker is given in its
// jail, the record, a node restart, stop, start with the data kept, and
// erase.
func TestFirecrackerInstance(t *testing.T) {
	r := newRig(t)
	testenv.RequireTools(t, "e2fsck", "resize2fs", "dumpe2fs")
	r.withFakeFirecracker()
	ctx := context.Background()
	ref := r.ext4Instance(hypervisor.Firecracker, 256)
	m := r.manager()
	if err := m.Start(ctx, ref); err != nil {
		t.Fatal(err)
	}
	rec, err := r.records.Get(ctx, ref)
	if err != nil || rec.Hypervisor != hypervisor.Firecracker || rec.State != execution.StateRunning {
		t.Fatalf("record %+v %v", rec, err)
	}
	disks := filepath.Join(r.dir, "volumes", string(ref))
	root := filepath.Join(disks, "rootfs.raw")
	if got := ext4Size(t, root); got != 256<<20 {
		t.Errorf("root filesystem is %d bytes, want 256 MiB", got)
	}
	if got := ext4Size(t, filepath.Join(disks, "base")); got != 64<<20 {
		t.Errorf("the base changed: %d bytes", got)
	}

	// What Firecracker was given, as it sees it from inside its jail.
	raw, err := os.ReadFile(filepath.Join(rec.VMDir, firecracker.ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	var cfg firecracker.Config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(cfg.BootSource.BootArgs, "root=LABEL=rootfs") || cfg.BootSource.InitrdPath == "" {
		t.Errorf("boot source %+v", cfg.BootSource)
	}
	if len(cfg.Drives) != 3 || cfg.Drives[0].IsReadOnly || !cfg.Drives[1].IsReadOnly || cfg.Drives[2].IsReadOnly {
		t.Fatalf("drives (root, cloud-init seed, volume) %+v", cfg.Drives)
	}
	if len(cfg.NetworkInterfaces) != 1 || cfg.NetworkInterfaces[0].HostDevName != rec.Tap {
		t.Errorf("network %+v, tap %s", cfg.NetworkInterfaces, rec.Tap)
	}
	iv := m.get(ref)
	jail := iv.vm.(interface{ Jail() *firecracker.Jail }).Jail()
	if jail == nil {
		t.Fatal("firecracker runs unjailed")
	}
	// The kernel in the jail is the node's vmlinux itself, linked.
	if !sameFile(t, filepath.Join(jail.Dir, "root", cfg.BootSource.KernelImagePath), filepath.Join(r.dir, "vmlinux")) {
		t.Error("the jail's kernel is not the node's vmlinux")
	}
	if !sameFile(t, filepath.Join(jail.Dir, "root", cfg.Drives[0].PathOnHost), root) {
		t.Error("the jail's root drive is not the instance's disk")
	}
	inode := inodeOf(t, root)

	// The node restarts: the VM is found again through its backend.
	pid := iv.vm.Pid()
	m.Shutdown()
	m2 := r.manager()
	if err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	if iv := m2.get(ref); iv == nil || iv.vm.Pid() != pid {
		t.Fatalf("instance not found again with pid %d", pid)
	}

	// Stopped (ctrl-alt-del ends the fake as a guest reboot ends
	// Firecracker): the jail goes, the disk stays.
	oldRun, ok := m2.Run(ref)
	if !ok {
		t.Fatal("no run of a running instance")
	}
	if running, err := m2.Stop(ctx, ref); err != nil || !running {
		t.Fatalf("stop: %v %v", running, err)
	}
	if _, err := os.Stat(jail.Dir); !os.IsNotExist(err) {
		t.Errorf("jail left after stop: %v", err)
	}
	if err := m2.Start(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if inodeOf(t, root) != inode {
		t.Error("the root disk was made again: its data is lost")
	}
	// A timer set for the earlier run (an expiry) does not stop this one.
	if stopped, err := m2.StopRun(ctx, ref, oldRun); stopped || err != nil || !m2.Running(ref) {
		t.Errorf("stopping the earlier run stopped this one: %v %v", stopped, err)
	}
	if err := m2.Erase(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(disks); !os.IsNotExist(err) {
		t.Errorf("disks left after erase: %v", err)
	}
}

// TestFirecrackerRefusals: what a node that cannot run an instance under
// Firecracker says, and that such a failure leaves nothing behind.
func TestFirecrackerRefusals(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()

	// No Firecracker on this node (as on the machine these tests run on).
	r.choose = hostcheck.Decide(hostcheck.Host{QEMU: hostcheck.Probe{OK: true}, Tun: hostcheck.Probe{OK: true}, NFTables: hostcheck.Probe{OK: true}},
		hostcheck.Settings{ProgramHypervisor: "auto", InstanceDefault: hypervisor.QEMU, UseJailer: true})
	ref := r.ext4Instance(hypervisor.Firecracker, 128)
	err := r.manager().Start(ctx, ref)
	var e *execution.Error
	if !asError(err, &e) || e.Status != 503 || !strings.Contains(err.Error(), "no KVM that runs ordinary guests") || !strings.Contains(err.Error(), "firecracker") {
		t.Errorf("firecracker asked where it cannot run: %v", err)
	}

	// Firecracker boots a kernel given directly: a disk image with its own
	// bootloader cannot be its root.
	r.withFakeFirecracker()
	disk := r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000001, "allow_amend": false,
		"environment": map[string]any{"internet": false, "hypervisor": "firecracker"},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"rootfs":      map[string]any{"parent": map[string]any{"ref": string(r.mbrBase()), "use_latest": false}, "persistence": "host", "size_mib": 64},
	})
	if err := r.manager().Start(ctx, disk); !asError(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), "bare ext4") {
		t.Errorf("disk image under firecracker: %v", err)
	}

	// Firecracker reads raw disks only: a layer cannot be its base.
	layer := filepath.Join(r.dir, "layer.qcow2")
	testenv.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", storage.LayerBacking(r.mbrBase()), layer, "32M")
	added, err := r.st.AddFile(ctx, layer)
	if err != nil {
		t.Fatal(err)
	}
	layered := r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000002, "allow_amend": false,
		"environment": map[string]any{"internet": false, "hypervisor": "firecracker"},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"rootfs":      map[string]any{"parent": map[string]any{"ref": string(added.Ref), "use_latest": false}, "persistence": "host", "size_mib": 64},
	})
	if err := r.manager().Start(ctx, layered); !asError(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), "raw disks only") {
		t.Errorf("layer under firecracker: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(r.dir, "jail", "firecracker")); len(entries) > 0 {
		t.Errorf("failed starts left jails: %v", entries)
	}
}

func ext4Size(t *testing.T, path string) int64 {
	t.Helper()
	var count, size int64
	for _, line := range strings.Split(testenv.Cmd(t, "dumpe2fs", "-h", path), "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch k {
		case "Block count":
			count, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		case "Block size":
			size, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return count * size
}

func inodeOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	return inodeOf(t, a) == inodeOf(t, b)
}
