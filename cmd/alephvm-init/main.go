// Command alephvm-init is the PID 1 of alephvm's program VMs. It runs from
// the initramfs built by package assets: it loads the kernel modules it
// needs, reads its configuration from the config drive, mounts the runtime
// as the root filesystem under a writable overlay together with the code,
// data and volumes, configures the network, serves the control protocol of
// package guest, and starts and supervises the workload as an unprivileged
// user. docs/guest-init.md describes the boot.
//
// Without a config drive but with root= on the kernel command line, it
// boots an instance instead: it mounts that root filesystem and hands over
// to its /sbin/init.
//
// It must be built static: CGO_ENABLED=0 go build ./cmd/alephvm-init.
package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

func main() {
	if len(os.Args) > 1 && os.Args[1] == "--version" {
		fmt.Println("alephvm-init", initVersion())
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "alephvm-init: must run as PID 1 of a VM")
		os.Exit(2)
	}
	// PID 1 must never exit: a panic in the init's code, on any of its
	// goroutines, ends in a power-off with the reason on the console
	// instead of a kernel panic (panic.go).
	runtime.LockOSThread()
	debug.SetTraceback("all")
	boot()
}

func initVersion() string {
	if version != "" {
		return version
	}
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				return "dev-" + s.Value[:12]
			}
		}
	}
	return "dev"
}
