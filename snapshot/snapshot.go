// Package snapshot keeps the templates programs start from: for each
// (hypervisor, kernel, initramfs, runtime, vCPUs, memory) a VM booted once
// to the point where its init waits for a program, stopped and saved
// (device state in one file, RAM in another). A program's VM restored
// from a template skips the kernel's boot and the init's module loading;
// the init then finds the VM's own drives and NIC and carries on as after
// a boot. See docs/snapshots.md.
package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
)

// Inputs are what a template's saved state depends on: a change of any
// builds another template.
type Inputs struct {
	// Hypervisor identifies the hypervisor's build (its binary's sha256):
	// a saved state loads only into the QEMU that wrote it.
	Hypervisor string `json:"hypervisor"`
	// Machine is the hypervisor backend's revision of the machine it
	// builds (qemu.MachineRevision): the same binary loads a state only
	// into the machine that saved it.
	Machine int `json:"machine,omitempty"`
	// Kernel, Initrd and Runtime are the files' sha256; Runtime is the
	// program's runtime (see docs/snapshots.md for why it is a key though
	// a template holds none of its bytes).
	Kernel    string `json:"kernel"`
	Initrd    string `json:"initrd"`
	Runtime   string `json:"runtime"`
	Cmdline   string `json:"cmdline"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
}

// Key is the template's name: the sha256 of its inputs.
func (in Inputs) Key() string {
	b, _ := json.Marshal(in)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// VM is a template VM as the manager drives it.
type VM interface {
	DialControl(ctx context.Context) (net.Conn, error)
	// SaveState stops the guest and writes its state to path.
	SaveState(ctx context.Context, path string) error
	Stop(ctx context.Context, halt func(context.Context) error, t hypervisor.StopTimeouts) error
}

// Hypervisor starts template VMs.
type Hypervisor interface {
	StartTemplate(ctx context.Context, spec hypervisor.Spec) (VM, error)
	// AttachTemplate finds the template VM a killed node left running in
	// dir, to stop it.
	AttachTemplate(ctx context.Context, dir string) (VM, error)
}

// Options configure a Manager.
type Options struct {
	// Dir holds the templates, one directory each (keep it short: the
	// template VM's sockets are made in it).
	Dir        string
	Hypervisor Hypervisor
	// BuildTimeout bounds a template's boot and save (default 3 min);
	// RetryAfter is how long a failed build is not tried again (10 min).
	BuildTimeout time.Duration
	RetryAfter   time.Duration
	// MaxProgramSnapshots bounds the programs' own snapshots kept (each
	// holds the RAM its program used); the least recently used go first.
	// Default 16.
	MaxProgramSnapshots int
	Log                 *slog.Logger
}

// Files of a template.
const (
	stateFile  = "state"
	memoryFile = "memory"
	metaFile   = "meta.json"
)

// meta is a template's record of itself, written last.
type meta struct {
	Key         string    `json:"key"`
	Inputs      Inputs    `json:"inputs"`
	Boot        bootMeta  `json:"boot"`
	Created     time.Time `json:"created"`
	StateSHA256 string    `json:"state_sha256"`
	MemSHA256   string    `json:"memory_sha256"`
	BuildTime   string    `json:"build_time"`
	// Program is set on a program's own snapshot (a second level): the
	// program it was taken of; Files are its other files, by sha256.
	Program string            `json:"program,omitempty"`
	Files   map[string]string `json:"files,omitempty"`
}

type bootMeta struct {
	Kernel  string `json:"kernel"`
	Initrd  string `json:"initrd"`
	Cmdline string `json:"cmdline"`
}

// Manager builds, checks, loads and drops templates. It is safe for
// concurrent use.
type Manager struct {
	opts Options

	mu       sync.Mutex
	loaded   map[string]*Template     // ready to restore from
	building map[string]chan struct{} // closed when the build ends
	failed   map[string]time.Time     // when a build last failed
	closed   bool
	// slot admits one build at a time: builds are background work, and
	// each is a VM that competes with the programs it is to speed up.
	slot   chan struct{}
	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
}

// Template is a template loaded for restores: its RAM sealed in memory,
// its state file checked.
type Template struct {
	key   string
	dir   string
	boot  hypervisor.Boot
	mem   *os.File // a sealed memfd holding the RAM
	state string
	size  int
	// Program is the program of a program's own snapshot, else empty.
	Program string
}

// File is the path of one of the template's other files (those its build
// wrote besides the RAM and the state).
func (t *Template) File(name string) string { return filepath.Join(t.dir, name) }

// Boot is the boot of the guest the template saved.
func (t *Template) Boot() hypervisor.Boot { return t.boot }

// CopyMemory writes the template's RAM into a new file at path, holes
// where it is zero: the RAM file of a VM restored from t whose own RAM is
// to be saved (a program's snapshot is built this way).
func (t *Template) CopyMemory(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(int64(t.size)); err != nil {
		f.Close()
		return err
	}
	buf := make([]byte, 1<<20)
	zero := make([]byte, len(buf))
	for off := 0; off < t.size; off += len(buf) {
		n, err := t.mem.ReadAt(buf, int64(off))
		if err != nil && !errors.Is(err, io.EOF) {
			f.Close()
			return err
		}
		if n > 0 && !bytesEqual(buf[:n], zero[:n]) {
			if _, err := f.WriteAt(buf[:n], int64(off)); err != nil {
				f.Close()
				return err
			}
		}
	}
	return f.Close()
}

// Key is the template's key.
func (t *Template) Key() string { return t.key }

// Apply turns the spec of a VM that would boot into the spec of the same
// VM restored from t: the template's boot (the saved guest is that
// kernel's), its RAM mapped copy-on-write, its state loaded, and every
// device on the slots the template and its restored VMs share.
func (t *Template) Apply(spec hypervisor.Spec) hypervisor.Spec {
	spec.Boot = t.boot
	spec.Memory = &hypervisor.Memory{Path: fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), t.mem.Fd())}
	spec.Incoming = t.state
	spec.FixedSlots = true
	return spec
}

// NewManager returns a manager of the templates in opts.Dir, stopping the
// template VMs and removing the files of builds a killed node left.
func NewManager(ctx context.Context, opts Options) (*Manager, error) {
	if opts.BuildTimeout == 0 {
		opts.BuildTimeout = 3 * time.Minute
	}
	if opts.RetryAfter == 0 {
		opts.RetryAfter = 10 * time.Minute
	}
	if opts.MaxProgramSnapshots == 0 {
		opts.MaxProgramSnapshots = 16
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("templates directory: %w", err)
	}
	entries, err := os.ReadDir(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("templates directory: %w", err)
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".build") {
			continue
		}
		dir := filepath.Join(opts.Dir, e.Name())
		if vm, err := opts.Hypervisor.AttachTemplate(ctx, dir); err == nil {
			stopCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err = vm.Stop(stopCtx, nil, templateStop)
			cancel()
			opts.Log.Warn("template VM of an interrupted build stopped", "dir", dir, "err", err)
		}
		os.RemoveAll(dir)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{opts: opts, slot: make(chan struct{}, 1), loaded: map[string]*Template{}, building: map[string]chan struct{}{},
		failed: map[string]time.Time{}, ctx: ctx, cancel: cancel}, nil
}

// Close stops the builds under way, waits for them, and releases the
// loaded templates (restored VMs keep their own mappings of them).
func (m *Manager) Close() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, t := range m.loaded {
		t.mem.Close()
		delete(m.loaded, k)
	}
}

// dirName is a template's directory: a prefix of its key is enough to
// tell templates apart and keeps socket paths short.
func (m *Manager) dirName(key string) string { return filepath.Join(m.opts.Dir, key[:16]) }

// Get returns the template of in and boot, loading it when it is built;
// when it is not, it starts its build in the background and returns nil:
// this VM boots, later ones restore.
func (m *Manager) Get(ctx context.Context, in Inputs, boot hypervisor.Boot) *Template {
	key := in.Key()
	m.mu.Lock()
	if t := m.loaded[key]; t != nil {
		m.mu.Unlock()
		return t
	}
	if _, ok := m.building[key]; ok || m.closed {
		m.mu.Unlock()
		return nil
	}
	m.mu.Unlock()
	t, err := m.load(key)
	if err == nil {
		m.mu.Lock()
		if old := m.loaded[key]; old != nil {
			m.mu.Unlock()
			t.mem.Close()
			return old
		}
		m.loaded[key] = t
		m.mu.Unlock()
		return t
	}
	if !errors.Is(err, os.ErrNotExist) {
		m.opts.Log.Warn("template unusable: dropped, to be built again", "template", key[:16], "err", err)
		os.RemoveAll(m.dirName(key))
	}
	m.startBuild(key, m.bootTemplate(key, in, boot))
	return nil
}

// Build builds the template of in now, unless it exists, and waits for it.
func (m *Manager) Build(ctx context.Context, in Inputs, boot hypervisor.Boot) error {
	key := in.Key()
	if _, err := os.Stat(filepath.Join(m.dirName(key), metaFile)); err == nil {
		return nil
	}
	done := m.startBuild(key, m.bootTemplate(key, in, boot))
	if done == nil {
		return errors.New("template build: not started (closed, or failed less than the retry delay ago)")
	}
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if _, err := os.Stat(filepath.Join(m.dirName(key), metaFile)); err != nil {
		return fmt.Errorf("template build failed (see the log): %w", err)
	}
	return nil
}

// Drop forgets a template that failed a restore, and removes its files:
// the next Get builds it again.
func (m *Manager) Drop(key string, why error) {
	m.mu.Lock()
	t := m.loaded[key]
	delete(m.loaded, key)
	m.mu.Unlock()
	if t != nil {
		t.mem.Close()
	}
	m.opts.Log.Warn("template dropped", "template", key[:16], "err", why)
	os.RemoveAll(m.dirName(key))
}

// BuildFunc makes a template's files in dir: the RAM in File "memory"
// (MemoryFile), the state in "state" (StateFile), any other file it names in
// its result. It returns the template's record: its inputs, boot and files.
type BuildFunc func(ctx context.Context, dir string) (Built, error)

// Built is what a BuildFunc made.
type Built struct {
	Inputs  Inputs
	Boot    hypervisor.Boot
	Program string
	Files   []string // names of the other files, in dir
}

// The files every template has.
const (
	MemoryFile = memoryFile
	StateFile  = stateFile
)

// startBuild starts build in the background and returns the channel
// closed when it ends, or nil when none was started.
func (m *Manager) startBuild(key string, build BuildFunc) chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if done, ok := m.building[key]; ok {
		return done
	}
	if m.closed || time.Since(m.failed[key]) < m.opts.RetryAfter {
		return nil
	}
	done := make(chan struct{})
	m.building[key] = done
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		started := time.Now()
		var b Built
		var err error
		select {
		case m.slot <- struct{}{}:
			started = time.Now()
			b, err = m.build(m.ctx, key, build)
			<-m.slot
		case <-m.ctx.Done():
			err = m.ctx.Err()
		}
		m.mu.Lock()
		delete(m.building, key)
		if err != nil {
			m.failed[key] = time.Now()
		}
		m.mu.Unlock()
		close(done)
		if err != nil {
			m.opts.Log.Error("template build failed: programs boot without it", "template", key[:16], "program", b.Program, "err", err, "retry_after", m.opts.RetryAfter)
			return
		}
		m.opts.Log.Info("template built", "template", key[:16], "program", b.Program, "vcpus", b.Inputs.VCPUs, "memory_mib", b.Inputs.MemoryMiB, "took", time.Since(started).Round(time.Millisecond))
	}()
	return done
}

// build runs a BuildFunc in a fresh directory and, when it succeeds,
// records the files' sha256 and puts the directory in place; nothing of a
// failed build stays.
func (m *Manager) build(ctx context.Context, key string, build BuildFunc) (b Built, err error) {
	ctx, cancel := context.WithTimeout(ctx, m.opts.BuildTimeout)
	defer cancel()
	started := time.Now()
	tmp := m.dirName(key) + ".build"
	os.RemoveAll(tmp)
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return b, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if b, err = build(ctx, tmp); err != nil {
		return b, err
	}
	// QEMU made the RAM file world-readable; the directory is not, but
	// the file need not be either.
	if err := os.Chmod(filepath.Join(tmp, memoryFile), 0o600); err != nil {
		return b, err
	}
	for _, name := range []string{"qmp.sock", "control.sock", "qga.sock", "qemu.pid"} {
		os.Remove(filepath.Join(tmp, name))
	}
	mt := meta{Key: key, Inputs: b.Inputs, Boot: bootMeta{Kernel: b.Boot.Kernel, Initrd: b.Boot.Initrd, Cmdline: b.Boot.Cmdline},
		Created: time.Now().UTC(), BuildTime: time.Since(started).Round(time.Millisecond).String(), Program: b.Program}
	if mt.StateSHA256, err = FileSHA256(filepath.Join(tmp, stateFile)); err != nil {
		return b, err
	}
	if mt.MemSHA256, err = FileSHA256(filepath.Join(tmp, memoryFile)); err != nil {
		return b, err
	}
	for _, name := range b.Files {
		if mt.Files == nil {
			mt.Files = map[string]string{}
		}
		if mt.Files[name], err = FileSHA256(filepath.Join(tmp, name)); err != nil {
			return b, err
		}
	}
	data, _ := json.MarshalIndent(mt, "", "  ")
	if err := writeSynced(filepath.Join(tmp, metaFile), data); err != nil {
		return b, err
	}
	final := m.dirName(key)
	os.RemoveAll(final)
	if err := os.Rename(tmp, final); err != nil {
		return b, fmt.Errorf("put the template in place: %w", err)
	}
	return b, nil
}

// bootTemplate is the BuildFunc of a first-level template: a VM booted
// until its init waits, then saved.
func (m *Manager) bootTemplate(key string, in Inputs, boot hypervisor.Boot) BuildFunc {
	return func(ctx context.Context, tmp string) (_ Built, err error) {
		boot.Cmdline = strings.TrimSpace(boot.Cmdline + " " + guest.TemplateFlag)
		built := Built{Inputs: in, Boot: boot}
		spec := hypervisor.Spec{
			Name: "template-" + key[:16], Dir: tmp, VCPUs: in.VCPUs, MemoryMiB: in.MemoryMiB, Boot: boot,
			Control: true, ControlPort: guest.ControlPortName, RebootExits: true,
			Memory: &hypervisor.Memory{Path: filepath.Join(tmp, memoryFile), Shared: true}, FixedSlots: true,
		}
		vm, err := m.opts.Hypervisor.StartTemplate(ctx, spec)
		if err != nil {
			return built, fmt.Errorf("start the template VM: %w", err)
		}
		defer func() {
			stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if serr := vm.Stop(stopCtx, nil, templateStop); serr != nil && err == nil {
				err = fmt.Errorf("stop the template VM: %w", serr)
			}
		}()
		if err := waitForTemplate(ctx, vm); err != nil {
			return built, err
		}
		if err := vm.SaveState(ctx, filepath.Join(tmp, stateFile)); err != nil {
			return built, fmt.Errorf("save the template: %w", err)
		}
		// The VM must be gone before its RAM file is read: stop it now.
		stopCtx, stopCancel := context.WithTimeout(ctx, 30*time.Second)
		defer stopCancel()
		if err := vm.Stop(stopCtx, nil, templateStop); err != nil {
			return built, fmt.Errorf("stop the template VM: %w", err)
		}
		return built, nil
	}
}

// GetProgram returns the program snapshot of key, or nil when there is
// none (a corrupt one is removed).
func (m *Manager) GetProgram(key string) *Template {
	m.mu.Lock()
	if t := m.loaded[key]; t != nil {
		m.mu.Unlock()
		return t
	}
	_, building := m.building[key]
	m.mu.Unlock()
	if building {
		return nil
	}
	t, err := m.load(key)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			m.opts.Log.Warn("program snapshot unusable: dropped", "template", key[:16], "err", err)
			os.RemoveAll(m.dirName(key))
		}
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old := m.loaded[key]; old != nil {
		t.mem.Close()
		return old
	}
	m.loaded[key] = t
	now := time.Now()
	os.Chtimes(filepath.Join(m.dirName(key), metaFile), now, now) // its last use, for eviction
	return t
}

// BuildProgram builds a program's snapshot of key in the background with
// build, unless it exists, is being built, or failed a short while ago.
func (m *Manager) BuildProgram(key string, build BuildFunc) {
	if _, err := os.Stat(filepath.Join(m.dirName(key), metaFile)); err == nil {
		return
	}
	m.evictProgramSnapshots(m.opts.MaxProgramSnapshots - 1)
	done := m.startBuild(key, build)
	if done == nil {
		return
	}
	// Loaded (checked, its RAM sealed) once built, so that the program's
	// next cold start does not wait for it.
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		select {
		case <-done:
			m.GetProgram(key)
		case <-m.ctx.Done():
		}
	}()
}

// evictProgramSnapshots removes the least recently used programs'
// snapshots past keep.
func (m *Manager) evictProgramSnapshots(keep int) {
	type snap struct {
		key  string
		used time.Time
	}
	var snaps []snap
	entries, _ := os.ReadDir(m.opts.Dir)
	for _, e := range entries {
		path := filepath.Join(m.opts.Dir, e.Name(), metaFile)
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var mt meta
		if json.Unmarshal(b, &mt) != nil || mt.Program == "" {
			continue
		}
		st, err := os.Stat(path)
		if err != nil {
			continue
		}
		snaps = append(snaps, snap{mt.Key, st.ModTime()})
	}
	if len(snaps) <= keep {
		return
	}
	slices.SortFunc(snaps, func(a, b snap) int { return a.used.Compare(b.used) })
	for _, s := range snaps[:len(snaps)-keep] {
		m.Drop(s.key, errors.New("evicted: more program snapshots than the limit"))
	}
}

// waitForTemplate waits for the template's init to report it waits.
func waitForTemplate(ctx context.Context, vm VM) error {
	conn, err := vm.DialControl(ctx)
	if err != nil {
		return fmt.Errorf("template control channel: %w", err)
	}
	client, err := guest.NewClient(ctx, conn)
	if err != nil {
		conn.Close()
		return fmt.Errorf("template control channel: %w", err)
	}
	defer client.Close()
	st, err := client.WaitFor(ctx, func(s guest.Status) bool { return s.State != guest.StateStarting })
	if err != nil {
		return fmt.Errorf("wait for the template's init: %w", err)
	}
	if st.State != guest.StateWaiting {
		return fmt.Errorf("the template's init is %s, not waiting: %s (is the init too old for templates?)", st.State, st.Error)
	}
	return nil
}

// load checks a built template's files against its record and seals its
// RAM in a memfd for restores.
func (m *Manager) load(key string) (*Template, error) {
	dir := m.dirName(key)
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return nil, err
	}
	var mt meta
	if err := json.Unmarshal(b, &mt); err != nil {
		return nil, fmt.Errorf("template record: %w", err)
	}
	if mt.Key != key {
		return nil, fmt.Errorf("template record names %s", mt.Key)
	}
	sum, err := FileSHA256(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	if sum != mt.StateSHA256 {
		return nil, fmt.Errorf("state file: sha256 %s, recorded %s", sum, mt.StateSHA256)
	}
	for name, want := range mt.Files {
		if strings.ContainsAny(name, "/") {
			return nil, fmt.Errorf("template record names the file %q", name)
		}
		if sum, err := FileSHA256(filepath.Join(dir, name)); err != nil || sum != want {
			return nil, fmt.Errorf("%s: sha256 %s, recorded %s (%v)", name, sum, want, err)
		}
	}
	mem, err := sealedCopy(filepath.Join(dir, memoryFile), "alephvm-template-"+key[:16], mt.MemSHA256, mt.Inputs.MemoryMiB<<20)
	if err != nil {
		return nil, err
	}
	return &Template{key: key, dir: dir, mem: mem, state: filepath.Join(dir, stateFile), size: mt.Inputs.MemoryMiB << 20, Program: mt.Program,
		boot: hypervisor.Boot{Kernel: mt.Boot.Kernel, Initrd: mt.Boot.Initrd, Cmdline: mt.Boot.Cmdline}}, nil
}

// sealedCopy copies a RAM file into a memfd of size bytes, checking its
// sha256, and seals it against writes, growth and shrinking: QEMU maps it
// private (copy-on-write), and a guest that takes over its QEMU cannot
// change the template under the other VMs through the descriptor it holds.
// Zero pages are skipped, so the memfd holds only what the guest wrote.
func sealedCopy(path, name, wantSHA256 string, size int) (_ *os.File, err error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd: %w", err)
	}
	mem := os.NewFile(uintptr(fd), name)
	defer func() {
		if err != nil {
			mem.Close()
		}
	}()
	if err := mem.Truncate(int64(size)); err != nil {
		return nil, fmt.Errorf("memfd: %w", err)
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	zero := make([]byte, len(buf))
	var off int64
	for {
		n, rerr := io.ReadFull(src, buf)
		if n > 0 {
			h.Write(buf[:n])
			if !bytesEqual(buf[:n], zero[:n]) {
				if _, err := mem.WriteAt(buf[:n], off); err != nil {
					return nil, fmt.Errorf("memfd: %w", err)
				}
			}
			off += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return nil, rerr
		}
	}
	if off != int64(size) {
		return nil, fmt.Errorf("memory file: %d bytes, the template's RAM is %d", off, size)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != wantSHA256 {
		return nil, fmt.Errorf("memory file: sha256 %s, recorded %s", sum, wantSHA256)
	}
	if _, err := unix.FcntlInt(mem.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_WRITE|unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		return nil, fmt.Errorf("seal the template's memory: %w", err)
	}
	return mem, nil
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// FileSHA256 is the sha256 of a file, in hex.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Sweep removes the templates no current input set names (keep: their
// keys), as the store's eviction runs: a new kernel, initramfs or QEMU
// leaves the old templates unusable.
func (m *Manager) Sweep(keep func(Inputs) bool) (removed int) {
	entries, _ := os.ReadDir(m.opts.Dir)
	for _, e := range entries {
		dir := filepath.Join(m.opts.Dir, e.Name())
		b, err := os.ReadFile(filepath.Join(dir, metaFile))
		if err != nil {
			continue // a build under way
		}
		var mt meta
		if json.Unmarshal(b, &mt) == nil && keep(mt.Inputs) {
			continue
		}
		m.mu.Lock()
		if t := m.loaded[mt.Key]; t != nil {
			t.mem.Close()
			delete(m.loaded, mt.Key)
		}
		m.mu.Unlock()
		if os.RemoveAll(dir) == nil {
			removed++
		}
	}
	return removed
}

// NewSeed returns the entropy a restored VM gets.
func NewSeed() ([]byte, error) {
	seed := make([]byte, 64)
	if _, err := unix.Getrandom(seed, 0); err != nil {
		return nil, fmt.Errorf("seed for a restored VM: %w", err)
	}
	return seed, nil
}

// templateStop ends a template VM: it is paused, or waits for nothing, so
// QEMU's own quit is the first step.
var templateStop = hypervisor.StopTimeouts{Quit: 10 * time.Second, Kill: 5 * time.Second}
