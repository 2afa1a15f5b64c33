package snapshot

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/hypervisor"
)

// agent is a template's init: it reports state.
type agent struct{ state guest.State }

func (a agent) Subscribe(context.Context) (guest.Status, <-chan guest.Event) {
	return a.Status(), make(chan guest.Event)
}
func (a agent) Status() guest.Status { return guest.Status{State: a.state} }
func (a agent) Logs(ctx context.Context, follow bool, _ func(guest.LogLine) error) error {
	return nil
}
func (a agent) Signal(syscall.Signal) error { return nil }
func (a agent) Exec(context.Context, guest.ExecRequest) (guest.ExecResult, error) {
	return guest.ExecResult{}, nil
}
func (a agent) Sysinfo() (guest.Sysinfo, error) { return guest.Sysinfo{}, nil }
func (a agent) Halt(context.Context) error      { return nil }
func (a agent) PowerOff()                       {}

// fakeHV starts template VMs whose init reports state, and whose RAM file
// it fills as QEMU would.
type fakeHV struct {
	state    guest.State
	mu       sync.Mutex
	started  []hypervisor.Spec
	stopped  int
	attached []string
}

type fakeVM struct {
	hv   *fakeHV
	spec hypervisor.Spec
}

func (h *fakeHV) StartTemplate(_ context.Context, spec hypervisor.Spec) (VM, error) {
	h.mu.Lock()
	h.started = append(h.started, spec)
	h.mu.Unlock()
	f, err := os.Create(spec.Memory.Path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	f.Truncate(int64(spec.MemoryMiB) << 20)
	f.WriteAt([]byte("kernel pages"), 3<<20)
	return &fakeVM{hv: h, spec: spec}, nil
}

func (h *fakeHV) AttachTemplate(_ context.Context, dir string) (VM, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.attached = append(h.attached, dir)
	return &fakeVM{hv: h}, nil
}

func (v *fakeVM) DialControl(context.Context) (net.Conn, error) {
	host, g := net.Pipe()
	go guest.ServeSession(context.Background(), g, g, "test", agent{v.hv.state})
	return host, nil
}

func (v *fakeVM) SaveState(_ context.Context, path string) error {
	return os.WriteFile(path, []byte("devices and CPUs"), 0o600)
}

func (v *fakeVM) Stop(context.Context, func(context.Context) error, hypervisor.StopTimeouts) error {
	v.hv.mu.Lock()
	v.hv.stopped++
	v.hv.mu.Unlock()
	return nil
}

var testInputs = Inputs{Hypervisor: "q", Kernel: "k", Initrd: "i", Runtime: "r", Cmdline: "console=ttyS0", VCPUs: 1, MemoryMiB: 16}

func newTestManager(t *testing.T, hv *fakeHV) (*Manager, string) {
	t.Helper()
	dir := t.TempDir()
	m, err := NewManager(context.Background(), Options{Dir: dir, Hypervisor: hv, RetryAfter: time.Hour, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m, dir
}

func TestKeyChangesWithEveryInput(t *testing.T) {
	base := testInputs.Key()
	for name, change := range map[string]func(*Inputs){
		"hypervisor": func(in *Inputs) { in.Hypervisor = "q2" },
		"kernel":     func(in *Inputs) { in.Kernel = "k2" },
		"initramfs":  func(in *Inputs) { in.Initrd = "i2" },
		"runtime":    func(in *Inputs) { in.Runtime = "r2" },
		"cmdline":    func(in *Inputs) { in.Cmdline += " quiet" },
		"vcpus":      func(in *Inputs) { in.VCPUs = 2 },
		"memory":     func(in *Inputs) { in.MemoryMiB = 32 },
	} {
		in := testInputs
		change(&in)
		if in.Key() == base {
			t.Errorf("changing the %s keeps the template's key", name)
		}
	}
}

func TestBuildGetAndApply(t *testing.T) {
	hv := &fakeHV{state: guest.StateWaiting}
	m, dir := newTestManager(t, hv)
	boot := hypervisor.Boot{Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0"}
	if m.Get(context.Background(), testInputs, boot) != nil {
		t.Fatal("a template before any build")
	}
	if err := m.Build(context.Background(), testInputs, boot); err != nil {
		t.Fatal(err)
	}
	spec := hv.started[0]
	if !strings.HasSuffix(spec.Boot.Cmdline, " "+guest.TemplateFlag) || !spec.Memory.Shared || !spec.FixedSlots || len(spec.Drives)+len(spec.NICs) != 0 {
		t.Errorf("template VM spec %+v", spec)
	}
	tmpl := m.Get(context.Background(), testInputs, boot)
	if tmpl == nil {
		t.Fatal("no template after its build")
	}
	got := tmpl.Apply(hypervisor.Spec{Name: "p", Boot: boot, MemoryMiB: 16})
	if got.Incoming != filepath.Join(dir, tmpl.Key()[:16], stateFile) || got.Memory.Shared || !got.FixedSlots || got.Boot.Cmdline != spec.Boot.Cmdline {
		t.Errorf("restored spec %+v", got)
	}
	// The sealed RAM: readable, not writable through any descriptor.
	mem, err := os.OpenFile(got.Memory.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	buf := make([]byte, 12)
	if _, err := mem.ReadAt(buf, 3<<20); err != nil || string(buf) != "kernel pages" {
		t.Errorf("template RAM reads %q, %v", buf, err)
	}
	if _, err := mem.WriteAt([]byte("x"), 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("a write to the template's RAM: %v, want EPERM", err)
	}
	if err := mem.Truncate(0); err == nil {
		t.Error("the template's RAM could be shrunk")
	}
}

func TestCorruptTemplateIsDroppedAndRebuilt(t *testing.T) {
	for _, file := range []string{stateFile, memoryFile, metaFile} {
		t.Run(file, func(t *testing.T) {
			hv := &fakeHV{state: guest.StateWaiting}
			m, dir := newTestManager(t, hv)
			if err := m.Build(context.Background(), testInputs, hypervisor.Boot{}); err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(filepath.Join(dir, testInputs.Key()[:16], file), os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte("corrupt"), 2)
			f.Close()
			if m.Get(context.Background(), testInputs, hypervisor.Boot{}) != nil {
				t.Fatal("a corrupt template was used")
			}
			waitFor(t, func() bool { return m.Get(context.Background(), testInputs, hypervisor.Boot{}) != nil })
			if len(hv.started) != 2 {
				t.Errorf("%d builds, want 2", len(hv.started))
			}
		})
	}
}

func TestFailedBuildLeavesNothingAndWaits(t *testing.T) {
	hv := &fakeHV{state: guest.StateFailed}
	m, dir := newTestManager(t, hv)
	if err := m.Build(context.Background(), testInputs, hypervisor.Boot{}); err == nil {
		t.Fatal("a build whose init failed succeeded")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("a failed build left %v", entries)
	}
	if hv.stopped == 0 {
		t.Error("the failed template VM was not stopped")
	}
	if m.Get(context.Background(), testInputs, hypervisor.Boot{}) != nil || len(hv.started) != 1 {
		t.Errorf("a failed build tried again at once: %d builds", len(hv.started))
	}
}

func TestDropAndSweep(t *testing.T) {
	hv := &fakeHV{state: guest.StateWaiting}
	m, dir := newTestManager(t, hv)
	other := testInputs
	other.Kernel = "old kernel"
	for _, in := range []Inputs{testInputs, other} {
		if err := m.Build(context.Background(), in, hypervisor.Boot{}); err != nil {
			t.Fatal(err)
		}
	}
	if n := m.Sweep(func(in Inputs) bool { return in.Kernel == "k" }); n != 1 {
		t.Errorf("sweep removed %d templates, want 1", n)
	}
	tmpl := m.Get(context.Background(), testInputs, hypervisor.Boot{})
	if tmpl == nil {
		t.Fatal("the kept template is gone")
	}
	m.Drop(tmpl.Key(), errors.New("restore failed"))
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("left after a drop and a sweep: %v", entries)
	}
}

func TestInterruptedBuildIsStoppedAtStart(t *testing.T) {
	dir := t.TempDir()
	left := filepath.Join(dir, "0123456789abcdef.build")
	os.Mkdir(left, 0o700)
	os.WriteFile(filepath.Join(left, memoryFile), []byte("x"), 0o600)
	hv := &fakeHV{}
	m, err := NewManager(context.Background(), Options{Dir: dir, Hypervisor: hv, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if len(hv.attached) != 1 || hv.stopped != 1 {
		t.Errorf("attached %v, stopped %d: the build's VM was not stopped", hv.attached, hv.stopped)
	}
	if _, err := os.Stat(left); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the interrupted build's files stay: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}
