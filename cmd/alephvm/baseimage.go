package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/baseimage"
	"github.com/alephvm/alephvm/hostcheck"
	"github.com/alephvm/alephvm/store"
)

// Names of the built base image's forms, for instance create --image.
const (
	imageDebian     = "debian-12"      // the UEFI-bootable disk
	imageDebianExt4 = "debian-12-ext4" // the bare ext4 root
)

func newBaseImageCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "base-image", Short: "Build the default base image of instances"}
	build := &cobra.Command{
		Use:   "build",
		Short: "Build the Debian base image (both forms) and add it to the store",
		Long: `Build the default instance base image with mmdebstrap, from this machine's apt
sources: Debian ` + baseimage.Suite + ` with systemd, cloud-init, openssh-server and
qemu-guest-agent, as a UEFI-bootable GPT disk ("` + imageDebian + `") and as a bare ext4 root
("` + imageDebianExt4 + `", booted with the kernel kept beside it). Both are added to the
store; their refs are printed. An image already built from the same recipe is
reused. Needs root, mmdebstrap and e2fsprogs, and takes a few minutes. The
same packages make the same bytes, so the same refs, on any node (docs/assets.md,
"Reproducible builds").

The "` + imageDebian + `" form boots under QEMU with the UEFI firmware (Debian's ovmf,
UEFI_FIRMWARE_CODE and UEFI_FIRMWARE_VARS); the build says when this host has
none.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			started := time.Now()
			img, err := baseimage.Build(cmd.Context(), baseImageDir(a.cfg.Config), baseimage.Options{Progress: os.Stderr, Log: a.log})
			if err != nil {
				return err
			}
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				for _, form := range []struct{ name, path string }{{imageDebian, img.Disk}, {imageDebianExt4, img.Ext4}} {
					added, err := s.AddFile(cmd.Context(), form.path)
					if err != nil {
						return err
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\t%s\n", form.name, added.Ref, form.path)
				}
				a.log.Info("base image ready", "took", time.Since(started).Round(time.Second))
				c := a.cfg.Config
				if fw := hostcheck.ProbeFirmware(c.UEFICode, c.UEFIVars, filepath.Join(c.ExecutionRoot, "volumes")); !fw.OK {
					fmt.Fprintf(cmd.ErrOrStderr(), "note: instances of %s cannot boot on this host: %s\n", imageDebian, fw.Found)
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "next: alephvm instance create --image %s --ssh-key ~/.ssh/id_ed25519.pub, then alephvm vm start HASH against a running node\n", imageDebian)
				return nil
			})
		},
	}
	cmd.AddCommand(build)
	return cmd
}

// baseImagePath resolves the names of the built base image's forms.
func (a *app) baseImagePath(name string) (string, bool, error) {
	if name != imageDebian && name != imageDebianExt4 {
		return "", false, nil
	}
	img, err := baseimage.Load(baseImageDir(a.cfg.Config))
	if err != nil {
		return "", true, fmt.Errorf("%s: build it first with alephvm base-image build: %w", name, err)
	}
	if name == imageDebianExt4 {
		return img.Ext4, true, nil
	}
	return img.Disk, true, nil
}
