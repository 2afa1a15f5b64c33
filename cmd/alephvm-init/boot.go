package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// newRoot is where the root filesystem is assembled before the switch.
const newRoot = "/newroot"

// logf writes a line to the console, which the host keeps apart from the
// workload's logs.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "alephvm-init: "+format+"\n", args...)
}

// uptime is the time since the kernel started.
func uptime() time.Duration {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// boot runs the init to the end: it never returns.
func boot() {
	start := uptime()
	defer recoverPanic()
	if err := mountEarly(); err != nil {
		fatal(fmt.Errorf("mount /dev, /proc, /sys: %w", err))
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	in := newInit()
	in.milestone(func(b *guest.Boot) { b.InitStart = start })

	loader, err := openModules(guest.ModuleIndexPath)
	if err != nil {
		fatal(err)
	}
	// Filesystem modules load while the devices are probed.
	fsLoaded := make(chan error, 1)
	goSafe(func() { fsLoaded <- loader.loadFilesystems() })
	have, err := loader.loadForDevices()
	if err != nil {
		fatal(err)
	}
	in.milestone(func(b *guest.Boot) { b.Modules = uptime(); b.ModuleWait = b.Modules - start })
	if hasKernelFlag(string(cmdline), guest.TemplateFlag) {
		if have, err = in.runTemplate(loader, have); err != nil {
			fatal(err)
		}
	}

	cfg, err := readConfig()
	if errors.Is(err, guest.ErrNotConfigDrive) || errors.Is(err, os.ErrNotExist) {
		if root := kernelArg(string(cmdline), "root"); root != "" {
			fatal(bootInstance(loader, root, hasKernelFlag(string(cmdline), "ro")))
		}
	}
	if err != nil {
		fatal(fmt.Errorf("config drive /dev/vda: %w", err))
	}
	in.cfg = cfg
	for i := range cfg.Drives {
		if err := waitForDevice("/dev/" + guest.DeviceName(i)); err != nil {
			fatal(err)
		}
	}
	in.milestone(func(b *guest.Boot) { b.Config = uptime() })
	in.trace("started at %v, modules loaded at %v, config read", ms(start), ms(in.Status().Boot.Modules))
	if !in.controlServed {
		goSafe(func() { in.serveControl(have) })
	}

	waitStart := uptime()
	err = <-fsLoaded
	in.milestone(func(b *guest.Boot) { b.ModuleWait += uptime() - waitStart })
	if err == nil {
		err = in.mountAll()
	}
	if err == nil {
		in.milestone(func(b *guest.Boot) { b.Mounts = uptime() })
		err = in.configureNetwork()
	}
	if err == nil {
		in.milestone(func(b *guest.Boot) { b.Network = uptime() })
		err = in.startWorkload()
	}
	if err != nil {
		in.failed(err)
	}
	goSafe(in.recordKernelHandoff)
	in.supervise()
}

// fatal reports an error the init cannot serve through, and ends the VM.
func fatal(err error) {
	logf("fatal: %v", err)
	powerOff(guest.HaltPowerOff)
}

// mountEarly mounts what the init needs before anything else.
func mountEarly() error {
	for _, m := range []struct{ fstype, target string }{
		{"devtmpfs", "/dev"},
		{"proc", "/proc"},
		{"sysfs", "/sys"},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.fstype, m.target, m.fstype, unix.MS_NOSUID, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.target, err)
		}
	}
	return nil
}

// readConfig reads the config drive, the first virtio block device.
func readConfig() (guest.Config, error) {
	f, err := os.Open("/dev/vda")
	if err != nil {
		return guest.Config{}, err
	}
	defer f.Close()
	cfg, err := guest.ReadConfigDrive(f)
	if err != nil {
		return cfg, err
	}
	return cfg, cfg.Validate()
}

// kernelArg returns the value of name=value on the kernel command line.
func kernelArg(cmdline, name string) string {
	for _, f := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(f, name+"="); ok {
			return v
		}
	}
	return ""
}

// hasKernelFlag reports whether a bare word is on the kernel command line.
func hasKernelFlag(cmdline, flag string) bool {
	for _, f := range strings.Fields(cmdline) {
		if f == flag {
			return true
		}
	}
	return false
}

// powerOff ends the VM. It never returns.
func powerOff(how guest.HaltAction) {
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if how == guest.HaltReboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	err := unix.Reboot(cmd)
	logf("reboot(%#x): %v", cmd, err)
	for {
		time.Sleep(time.Hour)
	}
}
