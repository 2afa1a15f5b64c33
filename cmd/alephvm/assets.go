package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/store"
)

func newAssetsCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "assets",
		Short: "Build, fetch and list what VMs boot from",
	}
	var opts assets.Options
	var skipRuntime bool
	build := &cobra.Command{
		Use:   "build",
		Short: "Build the kernel, initramfs and default runtime of programs",
		Long: `Build into the assets directory (ALEPH_VM_ASSETS_DIR) what program VMs boot
from, skipping what is up to date:

  kernel.bzimage, kernel.vmlinux  Debian's linux-image-cloud-amd64 (bzImage for
                                  QEMU, uncompressed vmlinux for Firecracker)
  initramfs                       alephvm-init and the kernel modules it loads
  runtime                         Debian with python3 and uvicorn, squashfs

Packages come from this machine's apt sources. Building the runtime runs
mmdebstrap and needs root; it takes a few minutes the first time. The
instance base image is built by "alephvm base-image build".`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts.Dir = a.cfg.Assets()
			opts.Runtime = !skipRuntime
			opts.Progress = cmd.ErrOrStderr()
			if opts.Init == "" {
				init, err := findInit()
				if err != nil {
					return err
				}
				opts.Init = init
			}
			// The runtime is registered in the store, so that messages can
			// name it by ref.
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				opts.Registry = storeRegistry{s}
				m, err := assets.Build(cmd.Context(), opts)
				if err != nil {
					return err
				}
				return printAssets(cmd, m)
			})
		},
	}
	build.Flags().StringVar(&opts.Init, "init", "", "static alephvm-init binary to put in the initramfs (default: alephvm-init beside this program, else in ../lib/alephvm/ from it, else on PATH)")
	build.Flags().StringVar(&opts.Suite, "suite", "bookworm", "Debian suite of the runtime")
	build.Flags().StringVar(&opts.KernelPackage, "kernel-package", "linux-image-cloud-amd64", "Debian kernel package (metapackage or versioned)")
	build.Flags().BoolVar(&skipRuntime, "skip-runtime", false, "do not build the program runtime")
	build.Flags().BoolVar(&opts.Rebuild, "rebuild", false, "rebuild everything, even what is up to date")
	build.Flags().BoolVar(&opts.KeepModuleSignatures, "keep-module-signatures", false, "keep the kernel modules' signatures in the initramfs (for a kernel that enforces them; costs boot time)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List the built and fetched assets with their size, sha256 and store ref",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := assets.Load(a.cfg.Assets())
			if err != nil {
				return err
			}
			return printAssets(cmd, m)
		},
	}

	fetch := &cobra.Command{
		Use:   "fetch MANIFEST",
		Short: "Download the files of a manifest, each pinned by its sha256",
		Long: `Download into the assets directory the files listed in MANIFEST, a JSON file:

  {"files": [{"name": "firecracker", "url": "https://...", "sha256": "...",
              "size": 3097088, "executable": true}]}

Each file streams to a .part file, is checked against its size and sha256 and
only then renamed into place, as fetched/<name>. Files already there with the
right sha256 are not downloaded again.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			fm, err := assets.ReadFetchManifest(args[0])
			if err != nil {
				return err
			}
			m, err := assets.Fetch(cmd.Context(), a.cfg.Assets(), fm, nil, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return printAssets(cmd, m)
		},
	}
	cmd.AddCommand(build, list, fetch)
	return cmd
}

// findInit looks for alephvm-init beside the running program, then where
// the Debian package puts it (../lib/alephvm/ from the program: the init is
// a guest's PID 1, not a command of the host), then on PATH.
func findInit() (string, error) {
	self, _ := os.Executable()
	return findInitFrom(self)
}

func findInitFrom(self string) (string, error) {
	if self != "" {
		dir := filepath.Dir(self)
		for _, p := range []string{filepath.Join(dir, "alephvm-init"), filepath.Join(dir, "..", "lib", "alephvm", "alephvm-init")} {
			if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
				return filepath.Clean(p), nil
			}
		}
	}
	if p, err := exec.LookPath("alephvm-init"); err == nil {
		return p, nil
	}
	return "", errors.New("no alephvm-init beside alephvm, in ../lib/alephvm/ or on PATH: build it with CGO_ENABLED=0 go build ./cmd/alephvm-init, or pass --init")
}

func printAssets(cmd *cobra.Command, m assets.Manifest) error {
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSIZE\tSHA256\tREF\tVERSION\tPATH")
	for _, as := range m.List() {
		ref := as.Ref
		if ref == "" {
			ref = "-"
		}
		fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\t%s\n", as.Name, as.Size, as.SHA256, ref, as.Version, filepath.Join(m.Dir, as.File))
	}
	return w.Flush()
}

// storeRegistry registers assets in the content store.
type storeRegistry struct{ s *store.Store }

func (r storeRegistry) AddFile(ctx context.Context, path string) (string, error) {
	added, err := r.s.AddFile(ctx, path)
	return string(added.Ref), err
}
