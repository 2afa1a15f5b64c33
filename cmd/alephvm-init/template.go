package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// The random driver's ioctls (linux/random.h): add bytes to the pool,
// credited with entropy, and reseed the CRNG from the pool now.
const (
	rndAddEntropy  = 0x40085203 // _IOW('R', 0x03, int[2])
	rndReseedCRNG  = 0x5207     // _IO('R', 0x07)
	pciRescan      = "/sys/bus/pci/rescan"
	deviceWaitTime = 10 * time.Second
)

// runTemplate is the boot of a template VM: every driver and filesystem a
// program may need is loaded, the control channel served, and the init
// waits, before it reads any config, for a resume. The VM is saved while
// it waits; each VM restored from it returns from here, with the clock and
// the entropy pool of its own and its own devices found on the PCI bus.
func (in *Init) runTemplate(loader *moduleLoader, have devices) (devices, error) {
	if err := loader.loadAll("virtio_blk", "virtio_net", "virtio_console"); err != nil {
		return have, err
	}
	if err := loader.loadFilesystems(); err != nil {
		return have, err
	}
	in.mu.Lock()
	in.state = guest.StateWaiting
	in.resumed = make(chan struct{})
	in.mu.Unlock()
	in.controlServed = true
	goSafe(func() { in.serveControl(have) })
	logf("template ready: waiting for a resume")
	<-in.resumed
	at := uptime()
	in.milestone(func(b *guest.Boot) { b.Resume = at })
	// The VM's own drives and NIC sit on slots the template left empty.
	if err := os.WriteFile(pciRescan, []byte("1"), 0); err != nil {
		return have, fmt.Errorf("rescan the PCI bus: %w", err)
	}
	if err := waitForDevice("/dev/vda"); err != nil { // the config drive
		return have, err
	}
	have.net = true
	in.trace("resumed at %v, devices found", ms(at))
	return have, nil
}

// Resume implements guest.ResumeAgent. A template's init (waiting)
// carries on as after a boot once the clock and pool are set; the init of
// a program's snapshot (its workload ready, no network) also gets its NIC
// and network, and its workload carries on.
func (in *Init) Resume(_ context.Context, req guest.ResumeRequest) error {
	if len(req.Seed) < guest.MinResumeSeed {
		return fmt.Errorf("resume: a seed of %d bytes, fewer than %d", len(req.Seed), guest.MinResumeSeed)
	}
	in.mu.Lock()
	st := in.state
	programSnapshot := st == guest.StateReady && in.cfg.Network == nil && req.Network != nil && !in.networked
	switch {
	case st == guest.StateWaiting && req.Network == nil:
		in.state = guest.StateStarting
	case programSnapshot:
		in.networked = true
	default:
		in.mu.Unlock()
		return fmt.Errorf("resume: the init is %s, not a waiting template or a program's snapshot to network", st)
	}
	in.mu.Unlock()
	ts := unix.NsecToTimespec(req.Time.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("resume: set the clock: %w", err)
	}
	if err := addEntropy(req.Seed); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	if !programSnapshot {
		close(in.resumed)
		return nil
	}
	if err := os.WriteFile(pciRescan, []byte("1"), 0); err != nil {
		return fmt.Errorf("resume: rescan the PCI bus: %w", err)
	}
	if err := waitForDevice("/sys/class/net/" + netInterface(*req.Network)); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	cfg := in.cfg
	cfg.Network = req.Network
	for file, content := range etcFiles(cfg) {
		os.Remove(file)
		if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
			return fmt.Errorf("resume: %w", err)
		}
	}
	if err := configureInterface(*req.Network); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	in.milestone(func(b *guest.Boot) { b.Resume = uptime() })
	return nil
}

// netInterface is the name of the VM's interface.
func netInterface(n guest.Network) string {
	if n.Interface == "" {
		return "eth0"
	}
	return n.Interface
}

// addEntropy mixes seed into the kernel's pool, credited as entropy, and
// reseeds the CRNG from it, so that what the workload reads from
// /dev/urandom differs from every other VM restored from the template.
func addEntropy(seed []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open /dev/urandom: %w", err)
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(seed))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(seed)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(seed)))
	copy(info[8:], seed)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndAddEntropy, uintptr(unsafe.Pointer(&info[0]))); e != 0 {
		return fmt.Errorf("add the seed to the entropy pool: %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndReseedCRNG, 0); e != 0 {
		return fmt.Errorf("reseed the kernel's random generator: %w", e)
	}
	return nil
}

// waitForDevice waits for a device node to appear after a rescan.
func waitForDevice(path string) error {
	deadline := time.Now().Add(deviceWaitTime)
	for {
		_, err := os.Stat(path)
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return fmt.Errorf("device %s after the PCI rescan: %w", path, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
