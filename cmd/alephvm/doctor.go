package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/baseimage"
	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/hostcheck"
)

func newDoctorCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check what this host can run, and say which hypervisors and disk methods the node will use",
		Long: `Probe this host (KVM usable for ordinary guests, the firecracker and jailer
binaries and their versions, QEMU, device-mapper, reflinks where the VMs'
disks go, the sockets of Firecracker's vsock, nftables, tun, cgroups, the
UEFI firmware, the programs that make disks), then say which hypervisor programs and instances will run
under, whether UEFI disk images boot, how Firecracker root disks will be
made, and why; then whether the program assets and the instance base
image are built, and how to build what is missing. Each probe does what the node will do (boots a probe guest
under KVM, asks device-mapper for its snapshot targets, makes a reflink, a
cgroup, a socket, a copy of the firmware's variables) rather than look for
a file. Run it as root, as the node runs. The exit status is 1 when
something of the host stops VMs from running.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.cfg.Config
			host := hostcheck.ProbeHost(cmd.Context(), hostPaths(c))
			plan := hostcheck.Decide(host, doctorSettings(c))
			err := writeDoctor(cmd.OutOrStdout(), host, plan)
			writeNodeFiles(cmd.OutOrStdout(), c)
			return err
		},
	}
}

// hostPaths are where the host probes look, for the node's settings.
func hostPaths(c config.Config) hostcheck.Paths {
	return hostcheck.Paths{
		Firecracker: c.FirecrackerPath, Jailer: c.JailerPath, QEMU: "qemu-system-x86_64",
		DataDir: filepath.Join(c.ExecutionRoot, "volumes"), RunDir: filepath.Join(c.ExecutionRoot, "vms"),
		UseJailer: c.UseJailer, JailerBase: c.JailerBase(), UEFICode: c.UEFICode, UEFIVars: c.UEFIVars,
	}
}

func doctorSettings(c config.Config) hostcheck.Settings {
	return hostcheck.Settings{Hypervisors: c.Hypervisors, ProgramHypervisor: c.ProgramHypervisor,
		InstanceDefault: c.InstanceHypervisor, UseJailer: c.UseJailer, QEMURunAs: c.QEMURunAs, QEMUFirstUID: c.QEMUFirstUID}
}

// writeDoctor prints the probes and the plan, and returns an error when
// VMs cannot run.
func writeDoctor(out io.Writer, h hostcheck.Host, p hostcheck.Plan) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "This host:")
	for _, probe := range []struct {
		name string
		hostcheck.Probe
	}{
		{"kvm", h.KVM}, {"firecracker", h.Firecracker}, {"jailer", h.Jailer}, {"qemu", h.QEMU},
		{"device-mapper", h.DeviceMapper}, {"reflink", h.Reflink}, {"nftables", h.NFTables},
		{"tun", h.Tun}, {"cgroups", h.Cgroups}, {"vsock", h.Vsock}, {"firmware", h.Firmware}, {"tools", h.Tools},
	} {
		mark := "ok"
		if !probe.OK {
			mark = "no"
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\n", probe.name, mark, probe.Found)
	}
	w.Flush()

	fmt.Fprintln(out, "\nSo:")
	fmt.Fprintf(out, "  firecracker: %s\n", usable(p.Firecracker))
	fmt.Fprintf(out, "  qemu:        %s\n", usable(p.QEMU))
	if p.QEMU.Usable {
		fmt.Fprintf(out, "  QEMU runs as %s, with its seccomp sandbox on\n", p.QEMURunsAs)
	}
	fmt.Fprintf(out, "  programs run under %s\n", choice(p.Programs))
	fmt.Fprintf(out, "  instances that name no hypervisor run under %s\n", choice(p.Instances))
	for _, hv := range []string{hostcheck.Firecracker, hostcheck.QEMU} {
		if _, err := p.ForInstance(hv); err != nil {
			fmt.Fprintf(out, "  instances that ask for %s are refused\n", hv)
		}
	}
	if p.UEFI.Usable {
		fmt.Fprintf(out, "  instances of UEFI disk images (debian-12) boot %s\n", p.UEFI.Why)
	} else {
		fmt.Fprintf(out, "  instances of UEFI disk images (debian-12) cannot boot: %s\n", p.UEFI.Why)
	}
	fmt.Fprintf(out, "  Firecracker instances' root disks are %s\n", p.RawDisksWhy)
	fmt.Fprintln(out, "  QEMU instances' root disks are qcow2 layers over their base image")
	var errs []string
	for _, problem := range p.Problems {
		fmt.Fprintf(out, "  problem: %s\n", problem)
		errs = append(errs, problem)
	}
	if p.Programs.Err != nil && p.Instances.Err != nil {
		errs = append(errs, "no hypervisor runs here")
	}
	if len(errs) > 0 {
		return errors.New("this host cannot run VMs: " + strings.Join(errs, "; "))
	}
	return nil
}

func usable(b hostcheck.Backend) string {
	if b.Usable {
		return "usable, " + b.Why
	}
	return "not usable: " + b.Why
}

func choice(c hostcheck.Choice) string {
	if c.Err != nil {
		return "nothing: " + c.Err.Error()
	}
	return c.Hypervisor + " (" + c.Why + ")"
}

// writeNodeFiles says whether what VMs boot from is built: the program
// assets (alephvm assets build) and the default base image (alephvm
// base-image build). Neither changes doctor's exit status: a node without
// them still runs what it can, and says so.
func writeNodeFiles(out io.Writer, c config.Config) {
	fmt.Fprintln(out, "\nThis node's files:")
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	defer w.Flush()
	if c.ProgramKernel != "" && c.ProgramInitrd != "" {
		fmt.Fprintf(w, "  program kernel\tset\t%s and %s (LINUX_PATH, INITRD_PATH)\n", c.ProgramKernel, c.ProgramInitrd)
	} else {
		var missing []string
		m, err := assets.Load(c.Assets())
		for _, name := range []assets.Name{assets.KernelBzImage, assets.KernelVmlinux, assets.Initramfs, assets.Runtime} {
			if _, perr := m.Path(name); err != nil || perr != nil {
				missing = append(missing, string(name))
			}
		}
		switch {
		case err != nil:
			fmt.Fprintf(w, "  program assets\tno\t%v: run \"alephvm assets build\"\n", err)
		case len(missing) > 0:
			fmt.Fprintf(w, "  program assets\tno\t%s missing in %s: programs cannot run until \"alephvm assets build\" builds them\n", strings.Join(missing, ", "), c.Assets())
		default:
			fmt.Fprintf(w, "  program assets\tok\tkernel, initramfs and runtime in %s\n", c.Assets())
		}
	}
	if _, err := baseimage.Load(baseImageDir(c)); err != nil {
		why := "not built in " + baseImageDir(c)
		if !errors.Is(err, os.ErrNotExist) {
			why = err.Error()
		}
		fmt.Fprintf(w, "  base image\tno\t%s: instances of the default image cannot boot until \"alephvm base-image build\" builds it\n", why)
	} else {
		fmt.Fprintf(w, "  base image\tok\tin %s\n", baseImageDir(c))
	}
}
