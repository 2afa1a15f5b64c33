package main

import (
	"database/sql"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/instance"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

func newImageCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Make base images from instances",
		Long: `Base images are files of the content store that INSTANCE messages name as
rootfs.parent. See docs/layers.md.`,
	}
	layer := &cobra.Command{
		Use:   "layer HASH",
		Short: "Store what a stopped instance wrote over its base as a qcow2 layer and print its ref",
		Long: `Make a qcow2 layer of instance HASH, an instance of this node that runs under
QEMU and is stopped (alephvm vm stop HASH): a copy of its root disk, which
holds only what the instance wrote over its base image, whose backing file
names that base by its item hash (aleph://<item hash>) with its format.
Add it to the content store and print the ref to use as rootfs.parent of
another instance, then the item hash of its parent, the file's sha256 and
size:

  ref     <item hash of the STORE message>
  parent  aleph://<item hash of the instance's base>
  sha256  <sha256 of the file>
  size    <bytes>

An instance over the layer gets the base's files with the instance's
writes over them; its rootfs.size_mib must be at least the instance's (the
layer's virtual size). The node resolves the parent through its store and
builds the chain itself, at most LAYER_MAX_DEPTH layers deep. A running
instance is refused: stop it first. Works on this machine's node directly
(EXECUTION_ROOT, CACHE_ROOT), with or without the node running.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			ref, err := message.ParseItemHash(args[0])
			if err != nil {
				return fmt.Errorf("instance %q: %w", args[0], err)
			}
			return a.withStoreDB(ctx, func(s *store.Store, database *sql.DB) error {
				volumes := filepath.Join(a.cfg.ExecutionRoot, "volumes")
				src, err := instance.FindLayerSource(ctx, execution.NewRecords(database), s, volumes, ref)
				if err != nil {
					return err
				}
				out := filepath.Join(src.Disks, "new-layer.qcow2")
				defer os.Remove(out)
				if err := instance.MakeLayer(ctx, src, out); err != nil {
					return err
				}
				added, err := s.AddFile(ctx, out)
				if err != nil {
					return err
				}
				a.log.Info("layer stored", "instance", ref, "ref", added.Ref, "parent", src.Parent)
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "ref     %s\nparent  %s\nsha256  %s\nsize    %d\n",
					added.Ref, storage.LayerBacking(src.Parent), added.SHA256, added.Size)
				return err
			})
		},
	}
	a.bindCommandSettings(layer)
	cmd.AddCommand(layer)
	return cmd
}
