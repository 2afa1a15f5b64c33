package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/apiclient"
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
		Short: "Store what an instance wrote over its base as a qcow2 layer and print its ref",
		Long: `Make a qcow2 layer of instance HASH, an instance of this node that runs under
QEMU, stopped or running: a copy of its root disk, which
holds only what the instance wrote over its base image, whose backing file
names that base by its item hash (aleph://<item hash>) with its format.
Add it to the content store and print the ref to use as rootfs.parent of
another instance, then the item hash of its parent, the file's sha256 and
size:

  ref          <item hash of the STORE message>
  parent       aleph://<item hash of the instance's base>
  sha256       <sha256 of the file>
  size         <bytes>

An instance over the layer gets the base's files with the instance's
writes over them; its rootfs.size_mib must be at least the instance's (the
layer's virtual size). The node resolves the parent through its store and
builds the chain itself, at most LAYER_MAX_DEPTH layers deep.

A stopped instance's layer is made here, on this machine's node directly
(EXECUTION_ROOT, CACHE_ROOT), with or without the node running. A running
instance's is made by the node (POST /control/machine/HASH/layer, as the
operator with ALEPH_VM_ALLOCATION_TOKEN, or as the owner with --key): its
root disk is copied while the guest's filesystems are frozen by its agent,
else while the VM is paused, and a last line says which:

  consistency  frozen | crash`,
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
				if errors.Is(err, instance.ErrRunning) {
					return a.runningLayer(cmd, ref)
				}
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
				return printLayer(cmd.OutOrStdout(), apiclient.Layer{Ref: added.Ref, Parent: storage.LayerBacking(src.Parent),
					SHA256: added.SHA256, Size: added.Size})
			})
		},
	}
	a.bindCommandSettings(layer)
	layer.Flags().StringVar(&a.vmCreds.keyFile, "key", "", "for a running instance: file holding the Ethereum private key (hex) of the VM owner's wallet: sign as the owner")
	layer.Flags().StringVar(&a.vmCreds.node, "node", "", "for a running instance: URL of the node (default: http://SUPERVISOR_HOST:SUPERVISOR_PORT)")
	cmd.AddCommand(layer)
	return cmd
}

// layersAPI makes layers of running instances for the API
// (POST /control/machine/{ref}/layer) and stores them.
type layersAPI struct {
	instances  *instance.Manager
	store      *store.Store
	volumesDir string
	log        *slog.Logger
}

func (l layersAPI) MakeLayer(ctx context.Context, ref message.ItemHash) (api.LayerAnswer, error) {
	dir := filepath.Join(l.volumesDir, string(ref))
	f, err := os.CreateTemp(dir, "new-layer-*.qcow2")
	if err != nil {
		return api.LayerAnswer{}, fmt.Errorf("layer of %s: %w", ref, err)
	}
	f.Close()
	out := f.Name()
	defer os.Remove(out)
	src, consistency, err := l.instances.MakeRunningLayer(ctx, ref, out)
	if err != nil {
		return api.LayerAnswer{}, err
	}
	added, err := l.store.AddFile(ctx, out)
	if err != nil {
		return api.LayerAnswer{}, err
	}
	l.log.Info("layer stored", "instance", ref, "ref", added.Ref, "parent", src.Parent, "consistency", consistency)
	return api.LayerAnswer{Ref: added.Ref, Parent: storage.LayerBacking(src.Parent), SHA256: added.SHA256,
		Size: added.Size, Consistency: string(consistency)}, nil
}

// runningLayer has the node make the layer of running instance ref.
func (a *app) runningLayer(cmd *cobra.Command, ref message.ItemHash) error {
	c, err := a.nodeClient()
	if err != nil {
		return err
	}
	l, err := c.MakeLayer(cmd.Context(), ref)
	if err != nil {
		return fmt.Errorf("instance %s runs: the node makes its layer: %w", ref, err)
	}
	return printLayer(cmd.OutOrStdout(), l)
}

// printLayer writes what `alephvm image layer` says of a layer it stored;
// the consistency line only for a running instance's.
func printLayer(w io.Writer, l apiclient.Layer) error {
	_, err := fmt.Fprintf(w, "ref          %s\nparent       %s\nsha256       %s\nsize         %d\n", l.Ref, l.Parent, l.SHA256, l.Size)
	if err == nil && l.Consistency != "" {
		_, err = fmt.Fprintf(w, "consistency  %s\n", l.Consistency)
	}
	return err
}
