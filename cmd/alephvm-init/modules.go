package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// moduleLoader loads kernel modules from the initramfs's module index,
// dependencies first. It is safe for concurrent use.
type moduleLoader struct {
	index  map[string]guest.Module
	root   string                   // prefix of the index's file paths
	insert func(guest.Module) error // loads one module; finitModule but in tests

	mu     sync.Mutex
	loaded map[string]*moduleLoad
}

type moduleLoad struct {
	done chan struct{}
	err  error
}

func openModules(indexPath string) (*moduleLoader, error) {
	f, err := os.Open(indexPath)
	if err != nil {
		return nil, fmt.Errorf("kernel module index: %w", err)
	}
	defer f.Close()
	index, err := guest.ParseModuleIndex(f)
	if err != nil {
		return nil, err
	}
	l := &moduleLoader{index: index, root: "/", loaded: map[string]*moduleLoad{}}
	l.insert = l.finitModule
	return l, nil
}

// load loads the named module after its dependencies. Loading a module
// twice, or one built into the kernel, does nothing.
func (l *moduleLoader) load(name string) error {
	l.mu.Lock()
	if ld, ok := l.loaded[name]; ok {
		l.mu.Unlock()
		<-ld.done
		return ld.err
	}
	ld := &moduleLoad{done: make(chan struct{})}
	l.loaded[name] = ld
	l.mu.Unlock()
	defer close(ld.done)

	m, ok := l.index[name]
	if !ok {
		ld.err = fmt.Errorf("kernel module %s is not in the initramfs", name)
		return ld.err
	}
	for _, dep := range m.Deps {
		if err := l.load(dep); err != nil {
			ld.err = fmt.Errorf("kernel module %s: %w", name, err)
			return ld.err
		}
	}
	if m.File == "" {
		return nil // built in
	}
	ld.err = l.insert(m)
	return ld.err
}

func (l *moduleLoader) finitModule(m guest.Module) error {
	f, err := os.Open(filepath.Join(l.root, m.File))
	if err != nil {
		return fmt.Errorf("kernel module %s: %w", m.Name, err)
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load kernel module %s: %w", m.Name, err)
	}
	return nil
}

// loadAll loads the named modules concurrently.
func (l *moduleLoader) loadAll(names ...string) error {
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Add(1)
		goSafe(func() {
			defer wg.Done()
			errs[i] = l.load(name)
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Virtio device types (virtio specification, "Device ID").
const (
	virtioNet     = 1
	virtioBlock   = 2
	virtioConsole = 3
	virtioVsock   = 19
)

// devices says which virtio devices the VM has.
type devices struct {
	net, console, vsock bool
}

// loadForDevices loads the virtio transports whose devices are present,
// then the drivers of the virtio devices found on them.
func (l *moduleLoader) loadForDevices() (devices, error) {
	var have devices
	var transports []string
	if hasVirtioPCI("/sys/bus/pci/devices") {
		transports = append(transports, "virtio_pci")
	}
	if hasVirtioMMIO("/sys/bus") {
		transports = append(transports, "virtio_mmio")
	}
	if len(transports) == 0 {
		return have, errors.New("no virtio devices: the VM needs at least the config drive")
	}
	if err := l.loadAll(transports...); err != nil {
		return have, err
	}
	types, err := virtioTypes("/sys/bus/virtio/devices")
	if err != nil {
		return have, err
	}
	var drivers []string
	for t := range types {
		switch t {
		case virtioBlock:
			drivers = append(drivers, "virtio_blk")
		case virtioNet:
			have.net = true
			drivers = append(drivers, "virtio_net")
		case virtioConsole:
			have.console = true
			drivers = append(drivers, "virtio_console")
		case virtioVsock:
			have.vsock = true
			drivers = append(drivers, "vmw_vsock_virtio_transport")
		}
	}
	return have, l.loadAll(drivers...)
}

// loadFilesystems loads what the program's mounts need.
func (l *moduleLoader) loadFilesystems() error {
	return l.loadAll("squashfs", "overlay", "ext4")
}

// hasVirtioPCI reports whether a PCI device of the virtio vendor exists.
func hasVirtioPCI(dir string) bool {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		vendor, _ := os.ReadFile(filepath.Join(dir, e.Name(), "vendor"))
		if strings.TrimSpace(string(vendor)) == "0x1af4" {
			return true
		}
	}
	return false
}

// hasVirtioMMIO reports whether virtio-mmio devices are declared, by ACPI
// (id LNRO0005, as Firecracker does) or on the command line.
func hasVirtioMMIO(bus string) bool {
	if m, _ := filepath.Glob(filepath.Join(bus, "acpi/devices/LNRO0005:*")); len(m) > 0 {
		return true
	}
	m, _ := filepath.Glob(filepath.Join(bus, "platform/devices/virtio-mmio*"))
	return len(m) > 0
}

// virtioTypes returns the device types of the virtio devices in dir.
func virtioTypes(dir string) (map[int]bool, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list virtio devices: %w", err)
	}
	types := map[int]bool{}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "device"))
		if err != nil {
			continue
		}
		if t, err := strconv.ParseInt(strings.TrimSpace(string(b)), 0, 32); err == nil {
			types[int(t)] = true
		}
	}
	return types, nil
}
