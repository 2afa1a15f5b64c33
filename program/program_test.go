package program

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/teststore"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

// fakeNetworks hands out one network and remembers its release.
type fakeNetworks struct {
	detached []string
	v6       network.IPv6Net // given to every VM
}

func (f *fakeNetworks) Attach(network.AttachRequest) (network.Attachment, error) {
	return network.Attachment{Allocation: network.Allocation{Index: 4, Network: netip.MustParsePrefix("172.16.4.0/24"),
		Host: netip.MustParseAddr("172.16.4.1"), Guest: netip.MustParseAddr("172.16.4.2"), Tap: "avm4"}, IPv6: f.v6}, nil
}

func (f *fakeNetworks) Detach(owner string) error {
	f.detached = append(f.detached, owner)
	return nil
}

// fakeHypervisor records the spec it is asked to start, and starts
// nothing.
type fakeHypervisor struct {
	name string
	spec hypervisor.Spec
}

var errNoVM = errors.New("no VM in this test")

func (f *fakeHypervisor) Name() string { return f.name }

func (f *fakeHypervisor) Start(_ context.Context, spec hypervisor.Spec) (execution.VM, error) {
	f.spec = spec
	// The backend sees the VM's files as they are when it starts.
	if _, err := os.Stat(spec.Drives[0].Path); err != nil {
		return nil, err
	}
	return nil, errNoVM
}

func (f *fakeHypervisor) Attach(context.Context, string) (execution.VM, error) { return nil, errNoVM }

// programStore is a store holding a PROGRAM message and its items.
func programStore(t *testing.T) (*store.Store, message.ItemHash) {
	t.Helper()
	return programStoreWith(t, []any{map[string]any{"ephemeral": true, "mount": "/tmp/e", "size_mib": 8}})
}

// programStoreWith is programStore with the program's volumes.
func programStoreWith(t *testing.T, volumes []any) (*store.Store, message.ItemHash) {
	t.Helper()
	return programStoreEdit(t, func(c map[string]any) { c["volumes"] = volumes })
}

// programStoreEdit is programStore with its content changed by edit.
func programStoreEdit(t *testing.T, edit func(content map[string]any)) (*store.Store, message.ItemHash) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	st, _ := teststore.Open(t, dir)
	add := func(name, data string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		added, err := st.AddFile(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		return string(added.Ref)
	}
	content := map[string]any{
		"address": "0x1", "time": 1700000000, "type": "vm-function", "allow_amend": false,
		"code":        map[string]any{"encoding": "zip", "entrypoint": "main:app", "ref": add("code.zip", "code"), "use_latest": false},
		"runtime":     map[string]any{"ref": add("runtime.squashfs", "runtime"), "use_latest": false, "comment": "test"},
		"on":          map[string]any{"http": true},
		"environment": map[string]any{"reproducible": false, "internet": false, "aleph_api": false, "shared_cache": false},
		"resources":   map[string]any{"vcpus": 2, "memory": 256, "seconds": 30},
		"volumes":     []any{},
	}
	edit(content)
	env := map[string]any{"chain": "ETH", "sender": "0x1", "type": "PROGRAM", "time": 1700000000, "item_type": "inline", "signature": nil, "content": content}
	raw, _ := json.Marshal(env)
	raw, err := message.Regenerate(raw)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := st.AddMessage(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	return st, msg.ItemHash
}

var testKernel = execution.Kernel{Kernel: "/k/bzImage", Vmlinux: "/k/vmlinux", Initrd: "/k/initramfs", Cmdline: "console=ttyS0"}

// TestBootSpec: a program's VM as each backend is asked to start it, and
// everything released when the start fails.
func TestBootSpec(t *testing.T) {
	if _, err := os.Stat("/usr/sbin/mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 is not installed (Debian: e2fsprogs): the ephemeral volume needs it")
	}
	for _, tc := range []struct{ hv, kernel string }{
		{hypervisor.QEMU, "/k/bzImage"},
		{hypervisor.Firecracker, "/k/vmlinux"},
	} {
		t.Run(tc.hv, func(t *testing.T) {
			st, ref := programStore(t)
			nets := &fakeNetworks{}
			hv := &fakeHypervisor{name: tc.hv}
			run := t.TempDir()
			l := New(Options{Store: st, Hypervisor: hv, Networks: nets, Kernel: testKernel, RunDir: run,
				VolumesDir: t.TempDir(), Logs: NewLogArchive(10), Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
			ctx := context.Background()
			plan, err := l.Plan(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := l.Boot(ctx, plan); !errors.Is(err, errNoVM) {
				t.Fatalf("boot: %v", err)
			}
			s := hv.spec
			if s.Boot.Kernel != tc.kernel || s.Boot.Initrd != "/k/initramfs" || s.VCPUs != 2 || s.MemoryMiB != 256 {
				t.Errorf("boot %+v, %d vcpus, %d MiB", s.Boot, s.VCPUs, s.MemoryMiB)
			}
			// The guest goes by the drives' order: config, runtime, code, volume.
			if len(s.Drives) != 4 || !s.Drives[0].ReadOnly || !s.Drives[1].ReadOnly || s.Drives[3].ReadOnly {
				t.Errorf("drives %+v", s.Drives)
			}
			if !s.Control || !s.RebootExits || len(s.NICs) != 1 || s.NICs[0].Tap != "avm4" {
				t.Errorf("control %v, reboot exits %v, nics %+v", s.Control, s.RebootExits, s.NICs)
			}
			if len(nets.detached) != 1 {
				t.Errorf("network released %d times", len(nets.detached))
			}
			if entries, _ := os.ReadDir(run); len(entries) != 0 {
				t.Errorf("runtime files left: %v", entries)
			}
		})
	}
}

// TestBootRefusals: a node that cannot run programs says why, before it
// takes anything.
func TestBootRefusals(t *testing.T) {
	st, ref := programStore(t)
	why := errors.New("no hypervisor can run programs here: firecracker: no KVM")
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"no hypervisor", Options{Unavailable: why, Kernel: testKernel}, "no KVM"},
		{"no vmlinux for firecracker", Options{Hypervisor: &fakeHypervisor{name: hypervisor.Firecracker},
			Kernel: execution.Kernel{Kernel: "/k/bzImage", Initrd: "/k/initramfs"}}, "no kernel image for firecracker"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nets := &fakeNetworks{}
			tc.opts.Store, tc.opts.Networks, tc.opts.RunDir = st, nets, t.TempDir()
			l := New(tc.opts)
			plan, err := l.Plan(context.Background(), ref)
			if err != nil {
				t.Fatal(err)
			}
			_, err = l.Boot(context.Background(), plan)
			var e *execution.Error
			if !errors.As(err, &e) || e.Status != 503 || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want a 503 saying %q", err, tc.want)
			}
			if len(nets.detached) != 0 {
				t.Error("a network was taken")
			}
		})
	}
}

// bootWith boots the program of st and ref under a fake hypervisor with
// disks, and returns the spec it was asked to start, what the network
// saw, and the error.
func bootWith(t *testing.T, st *store.Store, ref message.ItemHash, volumes string, disks storage.Disks) (hypervisor.Spec, *fakeNetworks, error) {
	t.Helper()
	nets := &fakeNetworks{}
	hv := &fakeHypervisor{name: hypervisor.QEMU}
	l := New(Options{Store: st, Hypervisor: hv, Networks: nets, Kernel: testKernel, RunDir: t.TempDir(),
		VolumesDir: volumes, Disks: disks, Logs: NewLogArchive(10), Log: slog.New(slog.DiscardHandler)})
	ctx := context.Background()
	plan, err := l.Plan(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	_, err = l.Boot(ctx, plan)
	return hv.spec, nets, err
}

// TestPersistentVolumeFiles: distinct volume names, those the old
// mapping made one ("a b" and "a_b") included, get distinct files; safe
// names keep the files they had.
func TestPersistentVolumeFiles(t *testing.T) {
	if _, err := os.Stat("/usr/sbin/mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 is not installed (Debian: e2fsprogs)")
	}
	vol := func(name, mount string) map[string]any {
		return map[string]any{"name": name, "persistence": "host", "size_mib": 8, "mount": mount}
	}
	st, ref := programStoreWith(t, []any{vol("a b", "/a"), vol("a_b", "/b"), vol("x", "/x"), vol("volume-x", "/y"), vol("../../escape", "/e")})
	volumes := t.TempDir()
	spec, _, err := bootWith(t, st, ref, volumes, storage.Disks{})
	if !errors.Is(err, errNoVM) {
		t.Fatalf("boot: %v", err)
	}
	var files []string
	for _, d := range spec.Drives[3:] {
		files = append(files, strings.TrimPrefix(d.Path, filepath.Join(volumes, string(ref))+"/"))
	}
	want := []string{"a%20b.ext4", "a_b.ext4", "x.ext4", "volume-x.ext4", "%2E%2E%2F%2E%2E%2Fescape.ext4"}
	if strings.Join(files, " ") != strings.Join(want, " ") {
		t.Errorf("volume files %q, want %q", files, want)
	}
	for _, f := range want {
		if _, err := os.Stat(filepath.Join(volumes, string(ref), f)); err != nil {
			t.Error(err)
		}
	}
}

// TestVolumesNeedSpace: a volume its filesystem cannot hold is refused
// with a 507 before the VM starts, and what the boot took is released.
func TestVolumesNeedSpace(t *testing.T) {
	full := storage.Disks{Free: func(string) (int64, error) { return 4 << 20, nil }}
	for name, volumes := range map[string][]any{
		"ephemeral":  {map[string]any{"ephemeral": true, "mount": "/tmp/e", "size_mib": 8}},
		"persistent": {map[string]any{"name": "data", "persistence": "host", "size_mib": 8, "mount": "/data"}},
	} {
		t.Run(name, func(t *testing.T) {
			st, ref := programStoreWith(t, volumes)
			dir := t.TempDir()
			spec, nets, err := bootWith(t, st, ref, dir, full)
			var se interface{ HTTPStatus() int }
			if !errors.As(err, &se) || se.HTTPStatus() != 507 || !strings.Contains(err.Error(), "not enough disk space") {
				t.Fatalf("got %v, want a 507", err)
			}
			if spec.Name != "" {
				t.Error("the VM was started")
			}
			if len(nets.detached) != 1 {
				t.Errorf("network released %d times", len(nets.detached))
			}
			if files, _ := filepath.Glob(filepath.Join(dir, "*", "*")); len(files) != 0 {
				t.Errorf("files left: %v", files)
			}
		})
	}
}
