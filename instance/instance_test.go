package instance

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/internal/backends"
	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/internal/teststore"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

func TestMain(m *testing.M) {
	flag.Parse()
	testassets.Prepare(false)
	prepareOwnImages()
	testenv.RunIsolated(m)
}

// rig is a node without its API: the store, the database, the network
// and QEMU, as buildNode wires them.
type rig struct {
	t       testing.TB
	dir     string
	st      *store.Store
	records *execution.Records
	hvs     execution.Hypervisors
	choose  Chooser
	boot    execution.Kernel
	fw      *network.Firewall
	disks   storage.Disks
	log     *slog.Logger
}

func newRig(t testing.TB) *rig {
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img", "nft", "mkfs.ext4")
	ctx := context.Background()
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	st, database := teststore.Open(t, dir)
	driver, err := qemu.New(ctx, qemu.Options{Accel: "tcg"}, log)
	if err != nil {
		t.Fatal(err)
	}
	fw := network.NewFirewall("lo", netip.MustParsePrefix("172.16.0.0/12"))
	t.Cleanup(func() { fw.Remove() })
	return &rig{t: t, dir: dir, st: st, records: execution.NewRecords(database),
		hvs: execution.Hypervisors{hypervisor.QEMU: backends.QEMUBackend(driver)}, fw: fw, log: log}
}

// manager is one node process's instance manager; a second one over the
// same rig is the node after a restart.
func (r *rig) manager() *Manager {
	pool, _ := network.NewPool(netip.MustParsePrefix("172.16.0.0/12"), 24, 4)
	nets := network.NewManager(pool, r.fw, network.DefaultPorts, r.log)
	return New(Options{
		Store: r.st, Hypervisors: r.hvs, Choose: r.choose, DirectBoot: r.boot, Networks: nets, Records: r.records,
		VolumesDir: filepath.Join(r.dir, "volumes"), RunDir: filepath.Join(r.dir, "vms"), Disks: r.disks, UnpackDir: filepath.Join(r.dir, "unpacked"),
		DNS: []netip.Addr{netip.MustParseAddr("10.0.0.53")}, DeveloperKeys: []string{"ssh-ed25519 AAAA dev"},
		StopTimeouts: hypervisor.StopTimeouts{Shutdown: 500 * time.Millisecond, Quit: 5 * time.Second, Kill: 5 * time.Second},
		Log:          r.log,
	})
}

// instanceMessage stores a base image (a disk whose MBR boot code halts
// the CPU) and an INSTANCE message over it.
func (r *rig) instanceMessage(sizeMiB int) message.ItemHash {
	added := r.mbrBase()
	return r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000000, "allow_amend": false,
		"authorized_keys": []string{"ssh-ed25519 AAAA owner"},
		"environment":     map[string]any{"internet": false, "hypervisor": "qemu"},
		"resources":       map[string]any{"vcpus": 1, "memory": 128, "seconds": 30, "published_ports": []any{map[string]any{"port": 80}}},
		"rootfs":          map[string]any{"parent": map[string]any{"ref": string(added), "use_latest": false}, "persistence": "host", "size_mib": sizeMiB},
		"volumes":         []any{map[string]any{"name": "data", "persistence": "host", "size_mib": 16, "mount": "/data"}},
	})
}

// mbrBase stores a 32 MiB disk whose MBR boot code halts the CPU.
func (r *rig) mbrBase() message.ItemHash {
	base := filepath.Join(r.dir, "base.img")
	img := make([]byte, 32<<20)
	copy(img, []byte{0xfa, 0xf4, 0xeb, 0xfd}) // boot code: cli; hlt; jmp to hlt
	img[510], img[511] = 0x55, 0xaa
	if err := os.WriteFile(base, img, 0o644); err != nil {
		r.t.Fatal(err)
	}
	added, err := r.st.AddFile(context.Background(), base)
	if err != nil {
		r.t.Fatal(err)
	}
	return added.Ref
}

// storeInstance stores an INSTANCE message of content, regenerated.
func (r *rig) storeInstance(content map[string]any) message.ItemHash {
	r.t.Helper()
	env := map[string]any{"chain": "ETH", "sender": "0x1", "type": "INSTANCE", "time": 1700000000, "item_type": "inline", "signature": nil, "content": content}
	raw, _ := json.Marshal(env)
	raw, err := message.Regenerate(raw)
	if err != nil {
		r.t.Fatal(err)
	}
	msg, err := r.st.AddMessage(context.Background(), raw)
	if err != nil {
		r.t.Fatal(err)
	}
	return msg.ItemHash
}

func testLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func tapIndex(t *testing.T, name string) int {
	t.Helper()
	iface, err := net.InterfaceByName(name)
	if err != nil {
		t.Fatalf("tap %s: %v", name, err)
	}
	return iface.Index
}

func TestInstanceLifecycle(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	ref := r.instanceMessage(2048)
	m := r.manager()
	if err := m.Start(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if err := m.Start(ctx, ref); err != nil {
		t.Fatalf("second start: %v", err)
	}
	rec, err := r.records.Get(ctx, ref)
	if err != nil || rec.State != execution.StateRunning || rec.Tap != "avm4" || len(rec.Forwards) != 2 {
		t.Fatalf("%+v %v", rec, err)
	}
	disks := filepath.Join(r.dir, "volumes", string(ref))
	info, err := storage.Inspect(ctx, storage.Image{Path: filepath.Join(disks, "rootfs.qcow2"), Format: storage.FormatQCOW2})
	if err != nil || info.VirtualSize != 2048<<20 || info.BackingFile != filepath.Join(disks, "base") {
		t.Errorf("root disk %+v %v", info, err)
	}
	for _, f := range []string{"cidata.iso", "volume-data.ext4"} {
		if _, err := os.Stat(filepath.Join(disks, f)); err != nil {
			t.Error(err)
		}
	}
	checkDiskChains(t, m.get(ref).vm.Pid(), disks)
	ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", network.TableName)
	if !strings.Contains(ruleset, "tcp dport 24000 dnat ip to 172.16.4.2:22") || !strings.Contains(ruleset, "dnat ip to 172.16.4.2:80") {
		t.Errorf("forwards missing:\n%s", ruleset)
	}
	pid := m.get(ref).vm.Pid()
	tap := tapIndex(t, "avm4")

	// The node stops (leaving the instance running) and starts again; the
	// record says starting, as a node killed between the VM's start and the
	// record's update leaves it: the VM is taken back, and runs.
	m.Shutdown()
	if err := r.records.SetState(ctx, ref, execution.StateStarting); err != nil {
		t.Fatal(err)
	}
	m2 := r.manager()
	if err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	if iv := m2.get(ref); iv == nil || iv.vm.Pid() != pid {
		t.Fatalf("instance not found again with pid %d", pid)
	}
	if tapIndex(t, "avm4") != tap {
		t.Error("the running instance's tap was recreated")
	}
	if rec, _ := r.records.Get(ctx, ref); rec.State != execution.StateRunning {
		t.Errorf("an instance taken back is recorded %s", rec.State)
	}

	// It dies while the node is down: the next node starts it again, on the
	// same network and host ports.
	m2.Shutdown()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for processAlive(pid) {
		time.Sleep(20 * time.Millisecond)
	}
	m3 := r.manager()
	if err := m3.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	iv := m3.get(ref)
	if iv == nil || iv.vm.Pid() == pid {
		t.Fatal("dead instance not restarted")
	}
	if rec, _ := r.records.Get(ctx, ref); rec.Tap != "avm4" || rec.Forwards[0].HostPort != 24000 {
		t.Errorf("restarted on another network or port: %+v", rec)
	}

	// Unlisted by the scheduler: stopped, disks kept.
	res := m3.Allocate(ctx, nil)
	if len(res.Stopped) != 1 || m3.Running(ref) {
		t.Fatalf("allocate: %+v", res)
	}
	if _, err := os.Stat(filepath.Join(disks, "rootfs.qcow2")); err != nil {
		t.Error("stop removed the disk")
	}
	if _, err := net.InterfaceByName("avm4"); err == nil {
		t.Error("tap kept after stop")
	}
	res = m3.Allocate(ctx, []message.ItemHash{ref})
	if len(res.Successful) != 1 || !m3.Running(ref) {
		t.Fatalf("allocate: %+v", res)
	}
	if err := m3.Reboot(ctx, ref); err != nil || !m3.Running(ref) {
		t.Fatalf("reboot: %v", err)
	}
	if err := m3.Erase(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(disks); !os.IsNotExist(err) {
		t.Errorf("disks left after erase: %v", err)
	}
	if _, err := r.records.Get(ctx, ref); err == nil {
		t.Error("record left after erase")
	}
	if ruleset := testenv.Cmd(t, "nft", "list", "table", "inet", network.TableName); strings.Contains(ruleset, "dnat") {
		t.Errorf("forwards left after erase:\n%s", ruleset)
	}
}

func TestInstanceRefusals(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	m := r.manager()
	small := r.instanceMessage(16) // below the 32 MiB base
	err := m.Start(ctx, small)
	var e *execution.Error
	if err == nil || !strings.Contains(err.Error(), "smaller than its base") {
		t.Errorf("smaller than base: %v", err)
	} else if !asError(err, &e) || e.Status != 400 {
		t.Errorf("status: %v", err)
	}
	if _, err := net.InterfaceByName("avm4"); err == nil {
		t.Error("failed start left its tap")
	}
	missing := message.ItemHash(strings.Repeat("ab", 32))
	if err := m.Start(ctx, missing); !asError(err, &e) || e.Status != 404 {
		t.Errorf("missing message: %v", err)
	}

	// Too many published ports: refused before anything is fetched (its
	// base image does not even exist).
	var ports []any
	for p := range DefaultMaxPublishedPorts + 1 {
		ports = append(ports, map[string]any{"protocol": "tcp", "port": 1000 + p})
	}
	many := r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000002, "allow_amend": false,
		"environment": map[string]any{"internet": false},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30, "published_ports": ports},
		"rootfs":      map[string]any{"parent": map[string]any{"ref": string(missing), "use_latest": false}, "persistence": "host", "size_mib": 64},
	})
	err = m.Start(ctx, many)
	if !asError(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), fmt.Sprintf("at most %d", DefaultMaxPublishedPorts)) {
		t.Errorf("%d published ports: %v", DefaultMaxPublishedPorts+1, err)
	}
}

// checkDiskChains checks that the VM of pid has exactly the disks the node
// built for it in disks, and that the root disk's chain is the layer over
// the base and nothing else, as the images declare it (qemu-img info
// --backing-chain) and as QEMU opened it (its open files).
func checkDiskChains(t *testing.T, pid int, disks string) {
	t.Helper()
	root := filepath.Dir(filepath.Dir(disks)) // the rig's directory
	var opened []string
	for _, f := range testenv.OpenFiles(t, pid) {
		if strings.HasPrefix(f, root+"/") && !strings.HasPrefix(f, filepath.Join(root, "vms")+"/") {
			opened = append(opened, f)
		}
	}
	slices.Sort(opened)
	opened = slices.Compact(opened)
	var want []string
	for _, f := range []string{"base", "cidata.iso", "rootfs.qcow2", "volume-data.ext4"} {
		want = append(want, filepath.Join(disks, f))
	}
	if !slices.Equal(opened, want) {
		t.Errorf("the VM opened %v, want %v", opened, want)
	}
	out := testenv.Cmd(t, "qemu-img", "info", "--backing-chain", "--output=json", "-U", "-f", "qcow2", filepath.Join(disks, "rootfs.qcow2"))
	var chain []struct {
		Filename string `json:"filename"`
		Format   string `json:"format"`
	}
	if err := json.Unmarshal([]byte(out), &chain); err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[0].Filename != want[2] || chain[0].Format != "qcow2" || chain[1].Filename != want[0] || chain[1].Format != "raw" {
		t.Errorf("root disk chain %+v", chain)
	}
	args, err := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(disks)), "vms", "i-"+filepath.Base(disks)[:16], qemu.ArgsFile))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(args), `"backing":"drive0-b0"`) {
		t.Errorf("the root disk's backing is not named to QEMU:\n%s", args)
	}
}

// TestInstanceRefusesBaseImages: a base image that names a backing file
// (here a host file the guest would read) or an external data file is
// refused with a 400 saying why, before anything is made for the
// instance; so is a root disk the node's disk cannot hold, with a 507.
func TestInstanceRefusesBaseImages(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	secret := filepath.Join(r.dir, "shadow")
	if err := os.WriteFile(secret, make([]byte, 32<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	// stored stores the image qemu-img makes with args, and an instance
	// over it.
	stored := func(size string, args ...string) message.ItemHash {
		img := filepath.Join(r.dir, "hostile.qcow2")
		os.Remove(img)
		args = append(append([]string{"create", "-q", "-f", "qcow2"}, args...), img)
		if size != "" {
			args = append(args, size)
		}
		testenv.Cmd(t, "qemu-img", args...)
		added, err := r.st.AddFile(ctx, img)
		if err != nil {
			t.Fatal(err)
		}
		return r.storeInstance(map[string]any{
			"address": "0x1", "time": 1700000000, "allow_amend": false, "authorized_keys": []string{},
			"environment": map[string]any{"internet": false, "hypervisor": "qemu"},
			"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
			"rootfs":      map[string]any{"parent": map[string]any{"ref": string(added.Ref), "use_latest": false}, "persistence": "host", "size_mib": 64},
		})
	}
	m := r.manager()
	unknown := strings.Repeat("9", 64)
	raw := string(r.mbrBase())
	for _, tc := range []struct {
		name   string
		ref    message.ItemHash
		status int
		want   string
	}{
		{"backing file", stored("", "-F", "raw", "-b", secret), 400, `names a backing file ("` + secret + `")`},
		{"data file", stored("32M", "-o", "data_file="+filepath.Join(r.dir, "data.raw")), 400, "external data file"},
		{"layer over an unknown item", stored("32M", "-u", "-F", "raw", "-b", storage.LayerScheme+unknown), 404, "aleph://" + unknown},
		{"layer naming a raw item as qcow2", stored("32M", "-u", "-F", "qcow2", "-b", storage.LayerScheme+raw), 400, `as a "qcow2" image, and that image is raw`},
	} {
		err := m.Start(ctx, tc.ref)
		var se interface{ HTTPStatus() int }
		if !errors.As(err, &se) || se.HTTPStatus() != tc.status || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want a %d saying %q", tc.name, err, tc.status, tc.want)
		}
		checkNothingMade(t, r, tc.ref)
	}

	r.disks = storage.Disks{Free: func(string) (int64, error) { return 1 << 30, nil }, Floor: 1 << 30}
	ref := r.instanceMessage(64)
	err := r.manager().Start(ctx, ref)
	var se interface{ HTTPStatus() int }
	if !errors.As(err, &se) || se.HTTPStatus() != 507 || !strings.Contains(err.Error(), "not enough disk space") {
		t.Errorf("full disk: got %v, want a 507", err)
	}
	checkNothingMade(t, r, ref)
}

// checkNothingMade checks that a refused start left no disk, tap or record.
func checkNothingMade(t *testing.T, r *rig, ref message.ItemHash) {
	t.Helper()
	if files, _ := filepath.Glob(filepath.Join(r.dir, "volumes", string(ref), "rootfs*")); len(files) > 0 {
		t.Errorf("disks made: %v", files)
	}
	if _, err := net.InterfaceByName("avm4"); err == nil {
		t.Error("tap left")
	}
	if _, err := r.records.Get(context.Background(), ref); err == nil {
		t.Error("record made")
	}
}

func asError(err error, target **execution.Error) bool {
	e, ok := err.(*execution.Error)
	if ok {
		*target = e
	}
	return ok
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || err == syscall.EPERM
}

// TestInstanceAdmission: instances are admitted into the node's capacity,
// which programs share: one that does not fit is refused 503 before
// anything is made, and a stopped instance gives its share back.
func TestInstanceAdmission(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	m := r.manager()
	adm := execution.NewAdmission(execution.Capacity{MemoryMiB: 200, VCPUs: 4})
	m.opts.Admission = adm
	first := r.instanceMessage(64)
	second := r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000003, "allow_amend": false,
		"environment": map[string]any{"internet": false, "hypervisor": "qemu"},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"rootfs":      map[string]any{"parent": map[string]any{"ref": string(r.mbrBase()), "use_latest": false}, "persistence": "host", "size_mib": 64},
	})
	if err := m.Start(ctx, first); err != nil {
		t.Fatal(err)
	}
	if used := adm.Used(); used != (execution.Capacity{MemoryMiB: 128, VCPUs: 1}) {
		t.Errorf("a running instance holds %+v", used)
	}
	var e *execution.Error
	if err := m.Start(ctx, second); !asError(err, &e) || e.Status != 503 || !errors.Is(err, execution.ErrInsufficientCapacity) {
		t.Fatalf("an instance past the capacity: %v, want 503", err)
	}
	if files, _ := filepath.Glob(filepath.Join(r.dir, "volumes", string(second), "*")); len(files) > 0 {
		t.Errorf("the refused instance has disks: %v", files)
	}
	if _, err := r.records.Get(ctx, second); err == nil {
		t.Error("the refused instance has a record")
	}
	if _, err := m.Stop(ctx, first); err != nil {
		t.Fatal(err)
	}
	if used := adm.Used(); used != (execution.Capacity{}) {
		t.Errorf("stopped, the node still holds %+v", used)
	}
	if err := m.Start(ctx, second); err != nil {
		t.Fatalf("once the first stopped: %v", err)
	}
	if _, err := m.Stop(ctx, second); err != nil {
		t.Fatal(err)
	}
}

// TestStoppedInstanceReleasesItsVolumes: an instance's immutable volume
// is pinned in the store while the VM runs and released once it stops.
func TestStoppedInstanceReleasesItsVolumes(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	m := r.manager()
	volFile := filepath.Join(r.dir, "volume.img")
	if err := os.WriteFile(volFile, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	vol, err := r.st.AddFile(ctx, volFile)
	if err != nil {
		t.Fatal(err)
	}
	ref := r.storeInstance(map[string]any{
		"address": "0x1", "time": 1700000004, "allow_amend": false,
		"environment": map[string]any{"internet": false, "hypervisor": "qemu"},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"rootfs":      map[string]any{"parent": map[string]any{"ref": string(r.mbrBase()), "use_latest": false}, "persistence": "host", "size_mib": 64},
		"volumes":     []any{map[string]any{"ref": string(vol.Ref), "use_latest": false, "mount": "/opt/v"}},
	})
	item, err := r.st.Fetch(ctx, vol.Ref, false)
	if err != nil {
		t.Fatal(err)
	}
	path := item.Path
	item.Release()
	pinned := func() bool {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		return syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil
	}
	if err := m.Start(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if !pinned() {
		t.Error("the volume of a running instance is not pinned")
	}
	if _, err := m.Stop(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if pinned() {
		t.Error("the volume of a stopped instance is still pinned")
	}
}

// failingBackend is a backend whose VMs never start.
type failingBackend struct{ execution.Hypervisor }

func (failingBackend) Start(context.Context, hypervisor.Spec) (execution.VM, error) {
	return nil, errors.New("the hypervisor refused the VM")
}

// TestStartFailuresLeaveNothing: an instance whose start fails after its
// admission, base image, root disk and network were taken gives each back.
func TestStartFailuresLeaveNothing(t *testing.T) {
	for _, tc := range []struct {
		name string
		rig  func(*rig)
		want string
	}{
		{"hypervisor fails", func(r *rig) { r.hvs[hypervisor.QEMU] = failingBackend{r.hvs[hypervisor.QEMU]} }, "refused the VM"},
		{"volume cannot be made", nil, "volume 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			ctx := context.Background()
			ref := r.instanceMessage(64)
			if tc.rig != nil {
				tc.rig(r)
			} else {
				// The disk keeps all but 512 MiB free: the root disk fits,
				// a volume of 2 GiB does not.
				var fs syscall.Statfs_t
				if err := syscall.Statfs(r.dir, &fs); err != nil {
					t.Fatal(err)
				}
				r.disks = storage.Disks{Floor: int64(fs.Bavail)*fs.Bsize - 512<<20}
				ref = r.storeInstance(map[string]any{
					"address": "0x1", "time": 1700000005, "allow_amend": false,
					"environment": map[string]any{"internet": false, "hypervisor": "qemu"},
					"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
					"rootfs":      map[string]any{"parent": map[string]any{"ref": string(r.mbrBase()), "use_latest": false}, "persistence": "host", "size_mib": 64},
					"volumes":     []any{map[string]any{"name": "big", "persistence": "host", "size_mib": 2048, "mount": "/big"}},
				})
			}
			m := r.manager()
			adm := execution.NewAdmission(execution.Capacity{MemoryMiB: 1024, VCPUs: 4})
			m.opts.Admission = adm
			if err := m.Start(ctx, ref); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("start: %v, want an error saying %q", err, tc.want)
			}
			if used := adm.Used(); used != (execution.Capacity{}) {
				t.Errorf("the failed start holds %+v", used)
			}
			if _, err := net.InterfaceByName("avm4"); err == nil {
				t.Error("tap left")
			}
			if rec, err := r.records.Get(ctx, ref); err == nil && rec.State != execution.StateStopped {
				t.Errorf("record %s", rec.State)
			}
			if m.Running(ref) {
				t.Error("running")
			}
			msg, _, _ := r.st.Message(ctx, ref)
			item, err := r.st.Fetch(ctx, msg.Content.(*message.InstanceContent).Rootfs.Parent.Ref, false)
			if err != nil {
				t.Fatal(err)
			}
			path := item.Path
			item.Release()
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
				t.Error("the base image is still pinned")
			}
		})
	}
}

// TestInstanceDiskSpace: an instance whose root disk the volumes'
// filesystem cannot hold (less the reserve and what running VMs were
// promised) is refused 507 before anything is made, and gives back its
// memory; with room, it starts and holds its promise until it stops.
func TestInstanceDiskSpace(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	m := r.manager()
	adm := execution.NewAdmission(execution.Capacity{MemoryMiB: 1024, VCPUs: 4})
	m.opts.Admission = adm
	free := int64(32 << 20)
	m.opts.DiskSpace = diskusage.NewLedger(r.dir, diskusage.Space{Reserve: 16 << 20,
		Free: func(string) (int64, error) { return free, nil }})
	ref := r.instanceMessage(64)
	var e *execution.Error
	err := m.Start(ctx, ref)
	if !asError(err, &e) || e.Status != 507 || !errors.Is(err, diskusage.ErrNoSpace) || !strings.Contains(err.Error(), "needs 80 MiB of disk") {
		t.Fatalf("80 MiB of disks with 16 MiB to spare: %v, want 507", err)
	}
	if files, _ := filepath.Glob(filepath.Join(r.dir, "volumes", string(ref), "*")); len(files) > 0 {
		t.Errorf("the refused instance has disks: %v", files)
	}
	if _, err := r.records.Get(ctx, ref); err == nil {
		t.Error("the refused instance has a record")
	}
	if used := adm.Used(); used != (execution.Capacity{}) {
		t.Errorf("the refused instance holds %+v", used)
	}
	free = 1 << 30
	if err := m.Start(ctx, ref); err != nil {
		t.Fatalf("with room: %v", err)
	}
	// Its promise (64 MiB less what its disk takes) counts against the next.
	if _, err := m.opts.DiskSpace.Reserve("another", free-(16<<20)-(1<<20)); !errors.Is(err, diskusage.ErrNoSpace) {
		t.Errorf("the running instance's promise is not counted: %v", err)
	}
	if _, err := m.Stop(ctx, ref); err != nil {
		t.Fatal(err)
	}
	release, err := m.opts.DiskSpace.Reserve("another", free-(16<<20)-(1<<20))
	if err != nil {
		t.Errorf("stopped, its promise is still held: %v", err)
	} else {
		release()
	}
}

// TestCompressedBaseImage: a base image stored compressed is unpacked once
// (by its content, whatever its name) and shared by the instances made
// from it; one that expands past the root disk is refused.
func TestCompressedBaseImage(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	img := make([]byte, 32<<20)
	copy(img, []byte{0xfa, 0xf4, 0xeb, 0xfd}) // boot code: cli; hlt; jmp to hlt
	img[510], img[511] = 0x55, 0xaa
	var packed bytes.Buffer
	zw := gzip.NewWriter(&packed)
	zw.Write(img)
	zw.Close()
	path := filepath.Join(r.dir, "base.img") // a name that says nothing
	os.WriteFile(path, packed.Bytes(), 0o644)
	added, err := r.st.AddFile(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	instance := func(sizeMiB int, name string) message.ItemHash {
		return r.storeInstance(map[string]any{
			"address": "0x1", "time": 1700000000, "allow_amend": false, "metadata": map[string]any{"name": name},
			"environment": map[string]any{"internet": false, "hypervisor": "qemu"},
			"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
			"rootfs":      map[string]any{"parent": map[string]any{"ref": string(added.Ref), "use_latest": false}, "persistence": "host", "size_mib": sizeMiB},
		})
	}
	m := r.manager()
	// 32 MiB unpacked does not fit a 16 MiB root disk: the unpacking
	// stops there.
	err = m.Start(ctx, instance(16, "small"))
	var e *execution.Error
	if !errors.As(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), "larger than rootfs.size_mib") {
		t.Errorf("an image larger than its disk: %v", err)
	}
	a, b := instance(64, "a"), instance(64, "b")
	for _, ref := range []message.ItemHash{a, b} {
		if err := m.Start(ctx, ref); err != nil {
			t.Fatal(err)
		}
		defer m.Erase(ctx, ref)
		base := filepath.Join(r.dir, "volumes", string(ref), "base")
		got, err := os.ReadFile(base)
		if err != nil || !bytes.Equal(got, img) {
			t.Fatalf("%s: the base is not the unpacked image: %v", ref, err)
		}
	}
	unpacked, _ := os.ReadDir(filepath.Join(r.dir, "unpacked"))
	if len(unpacked) != 1 {
		t.Errorf("unpacked %d times", len(unpacked))
	}
}
