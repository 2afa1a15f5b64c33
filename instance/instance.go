// Package instance runs the node's instances: persistent VMs with a
// copy-on-write root disk over their base image, a NoCloud seed, their
// network and port forwards, started and stopped by the scheduler and the
// operator, and found again after a node restart.
package instance

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/alephvm/alephvm/aggregate"
	"github.com/alephvm/alephvm/cloudinit"
	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/release"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

// Chooser says which hypervisor runs an instance whose message asks for
// asked (empty when it names none), or why this node cannot run it
// (hostcheck.Plan).
type Chooser interface {
	ForInstance(asked string) (string, error)
}

// DefaultMaxPublishedPorts bounds the ports an instance publishes when
// Options say nothing.
const DefaultMaxPublishedPorts = 64

// Options configure the instance manager.
type Options struct {
	Store       execution.Store
	Hypervisors execution.Hypervisors
	// Choose picks the backend of a new instance; nil means QEMU.
	Choose   Chooser
	Networks execution.Networks
	Records  *execution.Records
	// DirectBoot boots instances whose base image is a bare ext4
	// filesystem (the only form Firecracker boots): a kernel (and its
	// vmlinux for Firecracker), an initramfs that mounts /dev/vda, and
	// their command line.
	DirectBoot execution.Kernel
	// UEFICode and UEFIVars are the firmware of instances whose base image is
	// a partitioned disk: the code, and the template of the variable store
	// each instance gets a copy of.
	UEFICode string
	UEFIVars string
	// UnpackDir keeps the unpacked copies of compressed base images; empty
	// refuses them.
	UnpackDir string
	// LayerMaxDepth bounds the layers a base image may stack, each naming
	// its parent by item hash (storage.InspectChain); 0 means
	// storage.DefaultLayerMaxDepth.
	LayerMaxDepth int
	// VolumesDir keeps each instance's disks (VolumesDir/<hash>/), RunDir
	// its runtime files (sockets, console).
	VolumesDir string
	RunDir     string
	// Disks makes root disks and volumes, refusing those their filesystem
	// cannot hold; the zero value reads free space with statfs.
	Disks storage.Disks
	DNS   []netip.Addr
	// DeveloperKeys are added to every instance's authorized keys.
	DeveloperKeys []string
	// MaxPublishedPorts bounds the ports an instance's message may
	// publish; 0 means DefaultMaxPublishedPorts.
	MaxPublishedPorts int
	// Ports reads the ports an instance's owner asks to be forwarded (the
	// port-forwarding aggregate), beyond 22 and published_ports; nil
	// means none.
	Ports        PortSource
	StopTimeouts hypervisor.StopTimeouts
	// Admission accounts the memory and vCPUs of the node's VMs, programs
	// included: an instance the node cannot hold is refused (503) before
	// anything is made for it. Nil admits every instance.
	Admission *execution.Admission
	// DiskSpace promises disk space to instances before anything is made
	// for them (507 when the volumes' filesystem cannot hold their root
	// disk and volumes); nil checks nothing here.
	DiskSpace *diskusage.Ledger
	// ColdStarts, if set, is told of each start, with its phases.
	ColdStarts execution.StartObserver
	// Node is what messages' requirements are checked against.
	Node execution.Node
	Log  *slog.Logger
}

// PortSource reads the ports the owner of VM ref asks to be forwarded.
type PortSource interface {
	PortForwarding(ctx context.Context, owner, ref string) ([]aggregate.Port, error)
}

// forwardSetter changes the port forwards of a VM that runs
// (network.Manager).
type forwardSetter interface {
	SetForwards(owner string, ports []network.PortRequest) ([]network.Forward, error)
}

// Manager runs the node's instances: persistent VMs with their own root
// disk, started and stopped by the scheduler and the operator. Calls for
// one instance are serialized; calls for different instances are not.
type Manager struct {
	opts Options

	mu      sync.Mutex
	locks   map[message.ItemHash]*sync.Mutex
	running map[message.ItemHash]*instanceVM
	runs    uint64 // the id of the last run started
}

// New returns the instance manager.
func New(opts Options) *Manager {
	if opts.StopTimeouts == (hypervisor.StopTimeouts{}) {
		opts.StopTimeouts = hypervisor.DefaultStopTimeouts
	}
	return &Manager{opts: opts, locks: map[message.ItemHash]*sync.Mutex{}, running: map[message.ItemHash]*instanceVM{}}
}

// lock serializes the calls about one instance.
func (m *Manager) lock(ref message.ItemHash) func() {
	m.mu.Lock()
	l, ok := m.locks[ref]
	if !ok {
		l = &sync.Mutex{}
		m.locks[ref] = l
	}
	m.mu.Unlock()
	l.Lock()
	return l.Unlock
}

func (m *Manager) get(ref message.ItemHash) *instanceVM {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.running[ref]
}

// instanceVM is one running instance.
type instanceVM struct {
	ref message.ItemHash
	vm  execution.VM
	// made releases what its start took (admission, base image pin,
	// Firecracker root disk, network, volumes) once the VM is gone.
	made *release.List
	done chan struct{} // closed once the VM is gone and cleaned up
	run  uint64        // this run's id, set by track
}

// VM returns the instance's VM while it runs, for the node's metrics.
func (m *Manager) VM(ref message.ItemHash) (execution.VM, bool) {
	if iv := m.get(ref); iv != nil {
		return iv.vm, true
	}
	return nil, false
}

// Running reports whether the instance runs.
func (m *Manager) Running(ref message.ItemHash) bool { return m.get(ref) != nil }

// Start starts the instance ref; it does nothing if it runs.
func (m *Manager) Start(ctx context.Context, ref message.ItemHash) (err error) {
	defer m.lock(ref)()
	defer m.logFailure("start", ref, &err)
	if m.get(ref) != nil {
		return nil
	}
	return m.start(ctx, ref, -1)
}

func (m *Manager) start(ctx context.Context, ref message.ItemHash, netIndex int) (err error) {
	timing := execution.StartTiming()
	defer func() { timing.Report(m.opts.ColdStarts, ref, execution.TypeInstance, err) }()
	s, err := m.plan(ctx, ref, netIndex, timing)
	if err != nil {
		return err
	}
	// Each release is added as what it releases is made: a failed start
	// runs them, a started VM runs them once it is gone.
	defer func() {
		if err != nil {
			if rerr := s.made.Release(context.WithoutCancel(ctx)); rerr != nil {
				s.log.Error("release a failed instance start", "err", rerr)
			}
		}
	}()
	for _, phase := range []struct {
		name string
		run  func(context.Context, *instanceStart) error
	}{
		{"admission", m.admit},
		{"fetch", m.fetchBase},
		{"root disk", m.makeRootDisk},
		{"network", m.attach},
		{"volumes", m.makeVolumes},
		{"hypervisor", m.launch},
	} {
		if err := phase.run(ctx, s); err != nil {
			return err
		}
		s.timing.Done(phase.name)
	}
	s.log.Info("instance started", "hypervisor", s.hv.Name(), "ip", s.att.Guest, "tap", s.att.Tap, "forwards", s.att.Forwards,
		"boot", s.form, "phases", s.timing)
	m.track(&instanceVM{ref: ref, vm: s.vm, made: s.made, done: make(chan struct{})})
	return nil
}

// instanceStart is one start of an instance, as its phases build it.
type instanceStart struct {
	ref      message.ItemHash
	c        *message.InstanceContent
	hv       execution.Hypervisor
	netIndex int // the network found again after a restart, or -1
	log      *slog.Logger
	timing   *execution.Timing
	made     *release.List

	disks string // the instance's disks directory
	// chain is the base image and the layers under it, top first, as
	// linked among the instance's disks.
	chain   []storage.Image
	form    baseForm
	root    hypervisor.Drive
	boot    hypervisor.Boot
	att     network.Attachment
	runDir  string
	volumes []hypervisor.Drive
	spec    hypervisor.Spec
	vm      execution.VM
}

// plan reads the instance's message and refuses what the node cannot run,
// before anything is taken.
func (m *Manager) plan(ctx context.Context, ref message.ItemHash, netIndex int, timing *execution.Timing) (*instanceStart, error) {
	msg, _, err := m.opts.Store.Message(ctx, ref)
	if err != nil {
		return nil, execution.StoreError("Message", ref, err)
	}
	c, ok := msg.Content.(*message.InstanceContent)
	if !ok {
		return nil, &execution.Error{Status: 400, Msg: fmt.Sprintf("Message %s is a %s, not an INSTANCE", ref, msg.Type)}
	}
	if err := execution.CheckRequirements(c.ExecutableBase, c.Environment, m.opts.Node); err != nil {
		return nil, err
	}
	hv, err := m.hypervisor(ctx, ref, c)
	if err != nil {
		return nil, err
	}
	if c.Rootfs.Persistence != message.PersistenceHost {
		return nil, &execution.Error{Status: 400, Msg: "root filesystems kept on the network (persistence: store) are not supported"}
	}
	if limit := cmp.Or(m.opts.MaxPublishedPorts, DefaultMaxPublishedPorts); len(c.Resources.PublishedPorts) > limit {
		return nil, &execution.Error{Status: 400, Msg: fmt.Sprintf("the instance publishes %d ports: this node publishes at most %d per VM", len(c.Resources.PublishedPorts), limit)}
	}
	return &instanceStart{ref: ref, c: c, hv: hv, netIndex: netIndex, log: m.opts.Log.With("ref", ref),
		timing: timing, made: &release.List{}}, nil
}

// admit holds the instance's share of the node's capacity.
func (m *Manager) admit(_ context.Context, s *instanceStart) error {
	if m.opts.Admission != nil {
		need := execution.Capacity{MemoryMiB: int(s.c.Resources.MemoryMiB), VCPUs: int(s.c.Resources.VCPUs)}
		release, err := m.opts.Admission.Admit("instance "+string(s.ref), need)
		if err != nil {
			return &execution.Error{Status: 503, Msg: err.Error(), Err: err}
		}
		s.made.AddFunc("admission", release)
	}
	if m.opts.DiskSpace != nil {
		need := diskusage.DiskBytes(s.c.Rootfs.SizeMiB, s.c.Volumes)
		release, err := m.opts.DiskSpace.Reserve("instance "+string(s.ref), need, filepath.Join(m.opts.VolumesDir, string(s.ref)))
		if err != nil {
			return &execution.Error{Status: 507, Msg: "not enough disk space for the VM's disks", Err: err}
		}
		s.made.AddFunc("disk space", release)
	}
	return nil
}

// fetchBase fetches the base image, and the layers under it when it is a
// layer (all pinned until the VM is gone), and links them among the
// instance's disks.
func (m *Manager) fetchBase(ctx context.Context, s *instanceStart) error {
	parent, err := m.opts.Store.Fetch(ctx, s.c.Rootfs.Parent.Ref, s.c.Rootfs.Parent.UseLatest)
	if err != nil {
		return execution.StoreError("Base image", s.c.Rootfs.Parent.Ref, err)
	}
	s.made.AddFunc("base image", parent.Release)
	s.disks = filepath.Join(m.opts.VolumesDir, string(s.ref))
	if err := os.MkdirAll(s.disks, 0o700); err != nil {
		return err
	}
	path, err := m.unpacked(ctx, parent, s.c.Rootfs.SizeMiB<<20, s.log)
	if err != nil {
		return err
	}
	s.chain, s.form, err = m.base(ctx, path, parent.Ref, s)
	return err
}

// unpacked returns the base image to use for parent: parent itself, or,
// for a compressed image (gzip, xz or zstd, told by its content), its
// unpacked copy in UnpackDir, made once per image and shared by the
// instances made from it. An image that expands past the root disk's size
// is refused: it could not be the disk's base.
func (m *Manager) unpacked(ctx context.Context, parent *store.Item, limit int64, log *slog.Logger) (string, error) {
	c, err := storage.DetectCompression(parent.Path)
	if err != nil || c == storage.NotCompressed {
		return parent.Path, err
	}
	if m.opts.UnpackDir == "" {
		return "", &execution.Error{Status: 400, Msg: fmt.Sprintf("base image %s is %s-compressed and this node unpacks no images", parent.Ref, c)}
	}
	dst := filepath.Join(m.opts.UnpackDir, parent.SHA256)
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(m.opts.UnpackDir, 0o755); err != nil {
		return "", err
	}
	start := time.Now()
	err = storage.Unpack(ctx, parent.Path, c, dst, limit)
	if errors.Is(err, storage.ErrUnpackedTooLarge) {
		return "", &execution.Error{Status: 400, Msg: fmt.Sprintf("base image %s: %v: larger than rootfs.size_mib", parent.Ref, err)}
	} else if err != nil {
		return "", &execution.Error{Status: 400, Msg: fmt.Sprintf("base image %s could not be unpacked (%s): %v", parent.Ref, c, err)}
	}
	log.Info("base image unpacked", "compression", c, "took", time.Since(start).Round(time.Millisecond))
	return dst, nil
}

// makeRootDisk makes (or keeps) the root disk over the base, and chooses
// how the VM boots.
func (m *Manager) makeRootDisk(ctx context.Context, s *instanceStart) error {
	root, disk, err := m.rootDisk(ctx, s.ref, s.hv, s.chain, s.form, s.disks, s.c.Rootfs.SizeMiB, s.log)
	if err != nil {
		return err
	}
	s.root = root
	s.made.AddFunc("root disk", func() { releaseDisk(disk, m.opts.Log) })
	s.boot, err = m.boot(s.form, s.hv, s.disks)
	return err
}

// attach gives the VM its network and port forwards; ports held before
// keep their host ports.
func (m *Manager) attach(ctx context.Context, s *instanceStart) error {
	var held []network.Forward
	if rec, err := m.opts.Records.Get(ctx, s.ref); err == nil {
		held = rec.Forwards
	}
	ports := m.portRequests(ctx, s.ref, s.c, held, s.log)
	att, err := m.opts.Networks.Attach(network.AttachRequest{Owner: string(s.ref), Kind: network.KindInstance, Index: s.netIndex, Internet: s.c.Environment.Internet, Ports: ports})
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	s.att = att
	s.made.Add("network", func(context.Context) error { return m.opts.Networks.Detach(string(s.ref)) })
	return nil
}

// makeVolumes prepares the message's volumes and writes the cloud-init
// seed.
func (m *Manager) makeVolumes(ctx context.Context, s *instanceStart) error {
	s.runDir = filepath.Join(m.opts.RunDir, "i-"+string(s.ref)[:16])
	if err := os.MkdirAll(s.runDir, 0o700); err != nil {
		return err
	}
	for i, vol := range s.c.Volumes {
		d, release, err := m.volume(ctx, s.disks, s.runDir, i, vol)
		if err != nil {
			return fmt.Errorf("volume %d: %w", i, err)
		}
		if release != nil {
			s.made.AddFunc(fmt.Sprintf("volume %d", i), release)
		}
		s.volumes = append(s.volumes, d)
	}
	var seed cloudinit.Config
	seed, s.spec = instanceSpec(instanceInputs{Ref: s.ref, Content: s.c, Root: s.root, Seed: filepath.Join(s.disks, "cidata.iso"),
		Volumes: s.volumes, Network: s.att, Boot: s.boot, RunDir: s.runDir, DNS: m.opts.DNS, DeveloperKeys: m.opts.DeveloperKeys})
	return cloudinit.WriteSeed(s.spec.Drives[1].Path, seed)
}

// launch records the instance, then starts its VM: a node that dies
// meanwhile leaves a record that finds the VM again.
func (m *Manager) launch(ctx context.Context, s *instanceStart) error {
	rec := execution.Record{Ref: s.ref, Kind: execution.KindInstance, State: execution.StateStarting, Hypervisor: s.hv.Name(),
		VCPUs: s.spec.VCPUs, MemoryMiB: s.spec.MemoryMiB, NetIndex: s.att.Index, Tap: s.att.Tap,
		IPv4Network: s.att.Network.String(), IPv4: s.att.Guest.String(), VMDir: s.runDir, Forwards: s.att.Forwards}
	if v6 := s.att.IPv6; v6.Guest.IsValid() {
		rec.IPv6Network, rec.IPv6 = v6.Network.String(), v6.Guest.String()
	}
	// Put keeps the first record's creation time.
	if err := m.opts.Records.Put(ctx, rec); err != nil {
		return err
	}
	s.made.Add("record", func(ctx context.Context) error {
		return m.opts.Records.SetState(context.WithoutCancel(ctx), s.ref, execution.StateStopped)
	})
	vm, err := s.hv.Start(ctx, s.spec)
	if err != nil {
		return err
	}
	if err := m.opts.Records.SetState(ctx, s.ref, execution.StateRunning); err != nil {
		_ = vm.Stop(context.WithoutCancel(ctx), nil, hypervisor.StopTimeouts{Quit: 5 * time.Second, Kill: 5 * time.Second})
		return err
	}
	s.vm = vm
	return nil
}

// boot is how an instance of base image form boots under hv: the node's
// direct kernel for a bare ext4 image, its UEFI firmware (with the
// instance's own variable store in disks) for a partitioned one.
func (m *Manager) boot(form baseForm, hv execution.Hypervisor, disks string) (hypervisor.Boot, error) {
	switch form {
	case formExt4:
		boot, err := m.opts.DirectBoot.Boot(hv.Name())
		if err != nil {
			return boot, &execution.Error{Status: 503, Msg: "this node has no kernel to boot a bare ext4 base image (alephvm base-image build)", Err: err}
		}
		return boot, nil
	case formUEFI:
		if m.opts.UEFICode == "" {
			return hypervisor.Boot{}, &execution.Error{Status: 503, Msg: "this node has no UEFI firmware to boot a GPT base image (UEFI_FIRMWARE_CODE)"}
		}
		vars := filepath.Join(disks, "efivars.fd")
		if _, err := os.Stat(vars); errors.Is(err, os.ErrNotExist) {
			if _, err := storage.CloneFile(m.opts.UEFIVars, vars); err != nil {
				return hypervisor.Boot{}, fmt.Errorf("UEFI variable store: %w", err)
			}
		}
		return hypervisor.Boot{FirmwareCode: m.opts.UEFICode, FirmwareVars: vars}, nil
	}
	return hypervisor.Boot{}, nil
}

// hypervisor returns the backend of instance ref. An instance keeps the
// one it was first started under, whose root disk it has; a new one gets
// what its message asks for (environment.hypervisor), else the node's
// default, if this node can run it.
func (m *Manager) hypervisor(ctx context.Context, ref message.ItemHash, c *message.InstanceContent) (execution.Hypervisor, error) {
	if rec, err := m.opts.Records.Get(ctx, ref); err == nil && rec.Hypervisor != "" {
		hv, err := m.opts.Hypervisors.Get(rec.Hypervisor)
		if err != nil {
			return nil, &execution.Error{Status: 503, Msg: fmt.Sprintf("instance %s was made under %s, which this node does not run now", ref, rec.Hypervisor), Err: err}
		}
		return hv, nil
	}
	var asked string
	if c.Environment.Hypervisor != nil {
		asked = string(*c.Environment.Hypervisor)
	}
	name := hypervisor.QEMU
	if m.opts.Choose != nil {
		var err error
		if name, err = m.opts.Choose.ForInstance(asked); err != nil {
			return nil, &execution.Error{Status: 503, Msg: fmt.Sprintf("instance %s cannot run on this node (see alephvm doctor)", ref), Err: err}
		}
	} else if asked != "" && asked != hypervisor.QEMU {
		return nil, &execution.Error{Status: 503, Msg: fmt.Sprintf("instance %s asks for %s, which this node does not run", ref, asked)}
	}
	return m.opts.Hypervisors.Get(name)
}

// diskName names an instance's device-mapper devices.
func diskName(ref message.ItemHash) string { return "inst-" + string(ref)[:16] }

// rootDisk makes (or finds again, with its data) the instance's writable
// root disk over its base: a qcow2 layer under QEMU; under Firecracker,
// which reads raw images only, a raw disk (storage.CreateRawDisk: a
// device-mapper snapshot, a reflink or a copy), which only a bare ext4
// base can be, since Firecracker boots no bootloader. chain is the base
// and the layers under it, top first: QEMU is given it whole; Firecracker
// takes a base that is no layer.
func (m *Manager) rootDisk(ctx context.Context, ref message.ItemHash, hv execution.Hypervisor, chain []storage.Image, form baseForm, disks string, sizeMiB int64, log *slog.Logger) (hypervisor.Drive, storage.RawDisk, error) {
	base := chain[0]
	tooSmall := func(err error) error {
		if errors.Is(err, storage.ErrTooSmall) {
			return &execution.Error{Status: 400, Msg: err.Error()}
		}
		return err
	}
	if hv.Name() != hypervisor.Firecracker {
		rootfs := filepath.Join(disks, rootDiskFile)
		if err := recoverRestore(disks, log); err != nil {
			return hypervisor.Drive{}, storage.RawDisk{}, err
		}
		if d, ok, err := m.restoredRootDisk(ctx, rootfs, sizeMiB); ok || err != nil {
			return d, storage.RawDisk{}, err
		}
		if err := m.opts.Disks.CreateOverlay(ctx, base, rootfs, sizeMiB); err != nil {
			return hypervisor.Drive{}, storage.RawDisk{}, tooSmall(err)
		}
		// QEMU opens this chain, not the one the layers' headers name.
		backing := make([]hypervisor.Layer, len(chain))
		for i, img := range chain {
			backing[i] = hypervisor.Layer{Path: img.Path, Format: img.Format}
		}
		return hypervisor.Drive{Path: rootfs, Format: storage.FormatQCOW2, Serial: "rootfs", Backing: backing}, storage.RawDisk{}, nil
	}
	if len(chain) > 1 {
		return hypervisor.Drive{}, storage.RawDisk{}, &execution.Error{Status: 400,
			Msg: fmt.Sprintf("instance %s runs under firecracker, which reads raw disks only; its base image is a qcow2 layer over %d other images: run it under qemu", ref, len(chain)-1)}
	}
	if form != formExt4 {
		return hypervisor.Drive{}, storage.RawDisk{}, &execution.Error{Status: 400,
			Msg: fmt.Sprintf("instance %s runs under firecracker, which boots only a bare ext4 base image; its base is a %s image", ref, form)}
	}
	disk, err := m.opts.Disks.CreateRawDisk(ctx, base.Path, disks, diskName(ref), sizeMiB, log)
	if err != nil {
		return hypervisor.Drive{}, storage.RawDisk{}, tooSmall(err)
	}
	log.Info("root disk ready", "method", disk.Method, "path", disk.Path)
	return hypervisor.Drive{Path: disk.Path, Serial: "rootfs"}, disk, nil
}

// releaseDisk takes down the devices of a device-mapper root disk (its
// data stays in its copy-on-write file); it does nothing for the others.
func releaseDisk(disk storage.RawDisk, log *slog.Logger) {
	if err := disk.Release(context.Background()); err != nil {
		log.Error("release root disk", "disk", disk.Path, "err", err)
	}
}

// portRequests are the forwards an instance asks for: 22/tcp, its
// published_ports and its owner's port-forwarding aggregate. Ports held
// before keep their host ports; when the aggregate cannot be read, the
// ports held before stay as they were.
func (m *Manager) portRequests(ctx context.Context, ref message.ItemHash, c *message.InstanceContent, held []network.Forward, log *slog.Logger) []network.PortRequest {
	ports := []network.PortRequest{{Proto: "tcp", GuestPort: 22}}
	for _, p := range c.Resources.PublishedPorts {
		ports = append(ports, network.PortRequest{Proto: p.Protocol, GuestPort: uint16(p.Port)})
	}
	if m.opts.Ports != nil {
		asked, err := m.opts.Ports.PortForwarding(ctx, c.Address, string(ref))
		if err != nil {
			log.Warn("port-forwarding aggregate unreadable: the ports forwarded before stay", "owner", c.Address, "err", err)
			ports = append(ports, forwardsAsRequests(held)...)
		}
		for _, p := range asked {
			if p.TCP {
				ports = append(ports, network.PortRequest{Proto: "tcp", GuestPort: p.Port})
			}
			if p.UDP {
				ports = append(ports, network.PortRequest{Proto: "udp", GuestPort: p.Port})
			}
		}
	} else {
		ports = append(ports, forwardsAsRequests(held)...)
	}
	hostPorts := map[string]uint16{}
	for _, f := range held {
		hostPorts[f.Proto+"/"+strconv.Itoa(int(f.GuestPort))] = f.HostPort
	}
	seen := map[string]bool{}
	out := ports[:0]
	for _, p := range ports {
		key := p.Proto + "/" + strconv.Itoa(int(p.GuestPort))
		if seen[key] {
			continue
		}
		seen[key] = true
		p.HostPort = hostPorts[key]
		out = append(out, p)
	}
	return out
}

// UpdatePorts reads the instance's port-forwarding aggregate again and
// applies it, as its owner asks after changing it. It reports whether the
// instance runs: a stopped one gets its ports when it starts.
func (m *Manager) UpdatePorts(ctx context.Context, ref message.ItemHash) (bool, error) {
	defer m.lock(ref)()
	if m.get(ref) == nil {
		return false, nil
	}
	setter, ok := m.opts.Networks.(forwardSetter)
	if !ok {
		return true, errors.New("this node's network cannot change port forwards")
	}
	msg, _, err := m.opts.Store.Message(ctx, ref)
	if err != nil {
		return true, execution.StoreError("Message", ref, err)
	}
	c, ok := msg.Content.(*message.InstanceContent)
	if !ok {
		return true, fmt.Errorf("message %s is not an INSTANCE", ref)
	}
	rec, err := m.opts.Records.Get(ctx, ref)
	if err != nil {
		return true, err
	}
	log := m.opts.Log.With("ref", ref)
	fws, err := setter.SetForwards(string(ref), m.portRequests(ctx, ref, c, rec.Forwards, log))
	if err != nil {
		return true, fmt.Errorf("port forwards of %s: %w", ref, err)
	}
	rec.Forwards = fws
	if err := m.opts.Records.Put(ctx, rec); err != nil {
		return true, err
	}
	log.Info("port forwards updated", "forwards", fws)
	return true, nil
}

// Reinstall gives the instance a fresh root disk over its base image (read
// again) and starts it: its data volumes are erased too, unless
// eraseVolumes is false. Its network index and host ports stay.
func (m *Manager) Reinstall(ctx context.Context, ref message.ItemHash, eraseVolumes bool) error {
	defer m.lock(ref)()
	if _, err := m.opts.Records.Get(ctx, ref); err != nil {
		return &execution.Error{Status: 404, Msg: "No virtual machine with ref " + string(ref), Err: err}
	}
	if _, err := m.stop(ctx, ref); err != nil {
		return err
	}
	disks := filepath.Join(m.opts.VolumesDir, string(ref))
	entries, err := os.ReadDir(disks)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range entries {
		if !eraseVolumes && strings.HasPrefix(e.Name(), "volume-") {
			continue
		}
		if err := os.RemoveAll(filepath.Join(disks, e.Name())); err != nil {
			return fmt.Errorf("reinstall %s: %w", ref, err)
		}
	}
	m.opts.Log.Info("instance reinstalled", "ref", ref, "volumes_erased", eraseVolumes)
	return m.start(ctx, ref, -1)
}

func forwardsAsRequests(fws []network.Forward) []network.PortRequest {
	out := make([]network.PortRequest, len(fws))
	for i, f := range fws {
		out[i] = network.PortRequest{Proto: f.Proto, GuestPort: f.GuestPort, HostPort: f.HostPort}
	}
	return out
}

// track registers a running instance and watches for its VM to end: a
// guest that powers itself off stays off until it is started again.
func (m *Manager) track(iv *instanceVM) {
	m.mu.Lock()
	m.runs++
	iv.run = m.runs
	m.running[iv.ref] = iv
	m.mu.Unlock()
	go func() {
		<-iv.vm.Done()
		unlock := m.lock(iv.ref)
		defer unlock()
		m.release(iv, "vm exited")
	}()
}

// release frees what a stopped instance held; its disks stay.
func (m *Manager) release(iv *instanceVM, why string) {
	m.mu.Lock()
	if m.running[iv.ref] != iv {
		m.mu.Unlock()
		return
	}
	delete(m.running, iv.ref)
	m.mu.Unlock()
	ctx := context.Background()
	if err := iv.made.Release(ctx); err != nil {
		m.opts.Log.Error("release instance", "ref", iv.ref, "err", err)
	}
	m.opts.Log.Info("instance stopped", "ref", iv.ref, "why", why)
	close(iv.done)
}

// Run returns the id of the instance's current run, a new one each time
// it starts (a reboot too), and whether it runs.
func (m *Manager) Run(ref message.ItemHash) (uint64, bool) {
	if iv := m.get(ref); iv != nil {
		return iv.run, true
	}
	return 0, false
}

// StopRun stops the instance as Stop does if its current run is still run,
// so that a timer set for one run never stops a later one. It reports
// whether it stopped it.
func (m *Manager) StopRun(ctx context.Context, ref message.ItemHash, run uint64) (bool, error) {
	defer m.lock(ref)()
	if iv := m.get(ref); iv == nil || iv.run != run {
		return false, nil
	}
	return m.stop(ctx, ref)
}

// Stop stops the instance, through the guest's own shutdown first (ACPI
// power-off under QEMU, ctrl-alt-del under Firecracker); its disks stay. It reports whether it was running.
func (m *Manager) Stop(ctx context.Context, ref message.ItemHash) (_ bool, err error) {
	defer m.lock(ref)()
	defer m.logFailure("stop", ref, &err)
	return m.stop(ctx, ref)
}

// logFailure logs an operation on an instance that failed, with its
// reason: the caller gets the error, the operator reads the node's log.
func (m *Manager) logFailure(op string, ref message.ItemHash, err *error) {
	if *err != nil {
		m.opts.Log.Error("instance "+op+" failed", "ref", ref, "err", *err)
	}
}

func (m *Manager) stop(ctx context.Context, ref message.ItemHash) (bool, error) {
	iv := m.get(ref)
	if iv == nil {
		return false, nil
	}
	if err := iv.vm.Stop(ctx, nil, m.opts.StopTimeouts); err != nil {
		return true, err
	}
	m.release(iv, "asked")
	return true, nil
}

// Reboot stops the instance cleanly and starts it again.
func (m *Manager) Reboot(ctx context.Context, ref message.ItemHash) (err error) {
	defer m.lock(ref)()
	defer m.logFailure("reboot", ref, &err)
	if _, err := m.stop(ctx, ref); err != nil {
		return err
	}
	return m.start(ctx, ref, -1)
}

// Erase stops the instance and deletes its disks and its record.
func (m *Manager) Erase(ctx context.Context, ref message.ItemHash) (err error) {
	defer m.lock(ref)()
	defer m.logFailure("erase", ref, &err)
	if _, err := m.stop(ctx, ref); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(m.opts.VolumesDir, string(ref))); err != nil {
		return fmt.Errorf("erase disks of %s: %w", ref, err)
	}
	if err := os.RemoveAll(filepath.Join(m.opts.RunDir, "i-"+string(ref)[:16])); err != nil {
		return fmt.Errorf("erase runtime files of %s: %w", ref, err)
	}
	return m.opts.Records.Delete(ctx, ref)
}

// Restore finds the instances the records say are running, as after a
// node restart: a VM still running is taken back as it is (its tap and
// forwards kept); one that died meanwhile, or whose host rebooted, is
// started again. It is Adopt, then Restart.
func (m *Manager) Restore(ctx context.Context) error {
	gone, err := m.Adopt(ctx)
	return errors.Join(err, m.Restart(ctx, gone))
}

// Adopt takes back the instances the records say are running whose VM
// still runs, as they are (their tap and forwards kept), and returns the
// records of those whose VM is gone, for Restart. A node starting writes
// its firewall in between (network.Manager.DeferWrites): once, with every
// VM taken back, and before any VM starts.
func (m *Manager) Adopt(ctx context.Context) ([]execution.Record, error) {
	var gone []execution.Record
	err := m.opts.Records.EachLive(ctx, execution.KindInstance, func(rec execution.Record) error {
		running, err := m.adopt(ctx, rec)
		if err == nil && !running {
			gone = append(gone, rec)
		}
		return err
	})
	return gone, err
}

// Restart starts again the instances of recs, whose VMs Adopt found gone.
func (m *Manager) Restart(ctx context.Context, recs []execution.Record) error {
	var errs []error
	for _, rec := range recs {
		if err := m.restart(ctx, rec); err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", execution.KindInstance, rec.Ref, err))
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) restart(ctx context.Context, rec execution.Record) error {
	defer m.lock(rec.Ref)()
	return m.start(ctx, rec.Ref, rec.NetIndex)
}

// adopt takes back rec's instance if its VM runs, and reports whether it
// does.
func (m *Manager) adopt(ctx context.Context, rec execution.Record) (running bool, _ error) {
	defer m.lock(rec.Ref)()
	log := m.opts.Log.With("ref", rec.Ref)
	hv, err := m.opts.Hypervisors.Get(rec.HypervisorName())
	if err != nil {
		return false, err
	}
	vm, err := hv.Attach(ctx, rec.VMDir)
	if err != nil {
		log.Warn("instance not running any more, starting it again", "err", err)
		return false, nil
	}
	msg, _, err := m.opts.Store.Message(ctx, rec.Ref)
	if err != nil {
		return true, execution.StoreError("Message", rec.Ref, err)
	}
	c := msg.Content.(*message.InstanceContent)
	parent, err := m.opts.Store.Fetch(ctx, c.Rootfs.Parent.Ref, c.Rootfs.Parent.UseLatest)
	if err != nil {
		return true, execution.StoreError("Base image", c.Rootfs.Parent.Ref, err)
	}
	made := &release.List{}
	if m.opts.Admission != nil {
		// It runs: it holds its share whatever the node can hold now.
		made.AddFunc("admission", m.opts.Admission.Hold(execution.Capacity{MemoryMiB: rec.MemoryMiB, VCPUs: rec.VCPUs}))
	}
	if m.opts.DiskSpace != nil {
		made.AddFunc("disk space", m.opts.DiskSpace.Hold(diskusage.DiskBytes(c.Rootfs.SizeMiB, c.Volumes), filepath.Join(m.opts.VolumesDir, string(rec.Ref))))
	}
	made.AddFunc("base image", parent.Release)
	if _, err := m.opts.Networks.Attach(network.AttachRequest{Owner: string(rec.Ref), Kind: network.KindInstance, Index: rec.NetIndex, Internet: c.Environment.Internet, Ports: forwardsAsRequests(rec.Forwards)}); err != nil {
		_ = made.Release(ctx)
		return true, fmt.Errorf("network: %w", err)
	}
	log.Info("instance found running", "hypervisor", hv.Name(), "pid", vm.Pid(), "tap", rec.Tap)
	go settleInterruptedBackup(vm, log)
	if rec.State != execution.StateRunning {
		// A node killed between the VM's start and its record's update
		// left it starting: it runs.
		if err := m.opts.Records.SetState(ctx, rec.Ref, execution.StateRunning); err != nil {
			log.Error("record the instance taken back as running", "err", err)
		}
	}
	if disk, ok := storage.FindRawDisk(filepath.Join(m.opts.VolumesDir, string(rec.Ref)), diskName(rec.Ref)); ok {
		made.AddFunc("root disk", func() { releaseDisk(disk, m.opts.Log) })
	}
	made.Add("network", func(context.Context) error { return m.opts.Networks.Detach(string(rec.Ref)) })
	made.Add("record", func(ctx context.Context) error {
		return m.opts.Records.SetState(ctx, rec.Ref, execution.StateStopped)
	})
	m.track(&instanceVM{ref: rec.Ref, vm: vm, made: made, done: make(chan struct{})})
	return true, nil
}

// Shutdown lets instances run on without the node: it only drops the
// monitor connections.
func (m *Manager) Shutdown() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for ref, iv := range m.running {
		iv.vm.Close()
		delete(m.running, ref)
	}
}

// List returns the records of the node's instances.
func (m *Manager) List(ctx context.Context) ([]execution.Record, error) {
	return m.opts.Records.List(ctx, execution.KindInstance)
}

type baseForm string

const (
	formDisk baseForm = "disk" // an MBR disk, or a GPT disk with a BIOS boot partition, with its own bootloader, booted by the BIOS
	formUEFI baseForm = "uefi" // a GPT disk with an EFI system partition, booted by UEFI
	formExt4 baseForm = "ext4" // a bare filesystem, booted with the node's kernel
)

// base links the parent image into the instance's directory, so that the
// root disk's backing file stays even if the store evicts the parent, and
// reads the chain under it (storage.InspectChain): a parent that stands
// alone (no backing file, data file or encryption), or a layer naming its
// own parent by item hash, which is fetched through the store and linked
// there too (layer-<item hash>), down to a base that stands alone. It
// returns the chain, top first, and says how its disk boots. Existing
// links are kept: the instance's data was written over them.
func (m *Manager) base(ctx context.Context, parent string, parentRef message.ItemHash, s *instanceStart) ([]storage.Image, baseForm, error) {
	base := filepath.Join(s.disks, "base")
	made, err := keepLink(parent, base, s.log)
	if err != nil {
		return nil, "", fmt.Errorf("keep base image: %w", err)
	}
	if made {
		// What `alephvm image layer` names as the parent of a layer made
		// from this instance: the item its root disk was made over.
		if err := os.WriteFile(filepath.Join(s.disks, baseRefFile), []byte(parentRef+"\n"), 0o600); err != nil {
			return nil, "", fmt.Errorf("keep base image: %w", err)
		}
	}
	resolve := func(ctx context.Context, hash message.ItemHash) (string, error) {
		dst := filepath.Join(s.disks, layerPrefix+string(hash))
		if _, err := os.Stat(dst); err == nil {
			return dst, nil
		}
		item, err := m.opts.Store.Fetch(ctx, hash, false)
		if err != nil {
			return "", execution.StoreError("Item", hash, err)
		}
		s.made.AddFunc("layer parent "+string(hash), item.Release)
		path, err := m.unpacked(ctx, item, s.c.Rootfs.SizeMiB<<20, s.log)
		if err != nil {
			return "", err
		}
		if _, err := keepLink(path, dst, s.log); err != nil {
			return "", fmt.Errorf("keep layer parent %s: %w", hash, err)
		}
		return dst, nil
	}
	chain, err := storage.InspectChain(ctx, base, resolve, m.opts.LayerMaxDepth)
	if err != nil {
		return nil, "", err
	}
	images := storage.Images(chain)
	form, head, err := bootForm(ctx, images, s.disks)
	if err != nil {
		return nil, "", err
	}
	// The base does not change under an instance: it is looked into once.
	marker := filepath.Join(s.disks, "base.checked")
	if _, err := os.Stat(marker); errors.Is(err, os.ErrNotExist) {
		checked, err := guestCheck(ctx, chain, head, form, s.disks)
		if err != nil {
			return nil, "", err
		}
		if !checked {
			s.log.Warn("base image: its root filesystem was not looked into (not ext4, or no Linux partition); it must have cloud-init with the NoCloud datasource")
		}
		if err := os.WriteFile(marker, nil, 0o644); err != nil {
			return nil, "", fmt.Errorf("base image: %w", err)
		}
	}
	return images, form, nil
}

// The files base keeps among an instance's disks besides "base": the ref
// of the item linked as base, and the links to the layers under it.
const (
	baseRefFile = "base.ref"
	layerPrefix = "layer-"
)

// keepLink makes dst a hard link to src (a reflink or a copy across
// filesystems) unless dst exists, and reports whether it made it.
func keepLink(src, dst string, log *slog.Logger) (bool, error) {
	if _, err := os.Stat(dst); err == nil {
		return false, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return false, err
	}
	if err := os.Link(src, dst); err != nil {
		method, cerr := storage.CloneFile(src, dst)
		if cerr != nil {
			return false, errors.Join(err, cerr)
		}
		if method == storage.FullCopy {
			log.Warn("base image copied whole: the store and the volumes are on different filesystems without reflinks", "base", dst)
		}
	}
	return true, nil
}

// volume prepares one volume of an instance.
func (m *Manager) volume(ctx context.Context, disks, runDir string, i int, vol message.MachineVolume) (hypervisor.Drive, func(), error) {
	serial := fmt.Sprintf("vol%d", i)
	place := execution.VolumePlace{Path: filepath.Join(runDir, serial+".ext4"), Label: serial}
	if vol.Kind() == message.VolumePersistent {
		name, label := "", serial
		if vol.Name != nil && *vol.Name != "" {
			name, label = *vol.Name, execution.SafeName.ReplaceAllString(*vol.Name, "_")
		}
		place = execution.VolumePlace{Path: filepath.Join(disks, "volume-"+storage.VolumeFileName(name, i)+".ext4"), Label: label}
	}
	v, err := execution.PrepareVolume(ctx, m.opts.Store, m.opts.Disks, vol, place)
	if err != nil {
		return hypervisor.Drive{}, nil, err
	}
	return hypervisor.Drive{Path: v.Path, ReadOnly: v.ReadOnly, Serial: serial}, v.Release, nil
}

// AllocationResult is the reference's answer to an allocation.
type AllocationResult struct {
	Success    bool              `json:"success"`
	Successful []string          `json:"successful"`
	Failing    []string          `json:"failing"`
	Stopped    []string          `json:"stopped"`
	Errors     map[string]string `json:"errors"`
}

// Allocate makes the running instances the desired ones: those running and
// not listed are stopped, except those paid by stream or credit, which
// their owners start and stop themselves; those listed and not running are
// started, one after the other.
func (m *Manager) Allocate(ctx context.Context, desired []message.ItemHash) AllocationResult {
	res := AllocationResult{Success: true, Successful: []string{}, Failing: []string{}, Stopped: []string{}, Errors: map[string]string{}}
	want := map[message.ItemHash]bool{}
	for _, ref := range desired {
		want[ref] = true
	}
	m.mu.Lock()
	var unlisted []message.ItemHash
	for ref := range m.running {
		if !want[ref] {
			unlisted = append(unlisted, ref)
		}
	}
	m.mu.Unlock()
	for _, ref := range unlisted {
		if m.paidByUse(ctx, ref) {
			continue
		}
		if _, err := m.Stop(ctx, ref); err != nil {
			res.Errors[string(ref)] = err.Error()
			continue
		}
		res.Stopped = append(res.Stopped, string(ref))
	}
	for _, ref := range desired {
		if err := m.Start(ctx, ref); err != nil {
			res.Success = false
			res.Failing = append(res.Failing, string(ref))
			res.Errors[string(ref)] = err.Error()
			continue
		}
		res.Successful = append(res.Successful, string(ref))
	}
	return res
}

// paidByUse reports whether an instance is paid by stream or credit.
func (m *Manager) paidByUse(ctx context.Context, ref message.ItemHash) bool {
	msg, _, err := m.opts.Store.Message(ctx, ref)
	if err != nil {
		return false
	}
	c, ok := msg.Content.(*message.InstanceContent)
	return ok && c.Payment != nil && (c.Payment.Type == message.PaymentSuperfluid || c.Payment.Type == message.PaymentCredit)
}
