package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/execution"
)

func newStorageCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "storage",
		Short: "Show the node's disk space by kind and reclaim what no VM owns",
		Long: `The node's files live under CACHE_ROOT (the content store, the base image) and
EXECUTION_ROOT (instances' disks and persistent volumes under volumes/, run
directories under vms/, programs' output under logs/). "storage status"
measures them; "storage reclaim" removes what no execution record owns. See
docs/storage.md.`,
	}
	var asJSON bool
	status := &cobra.Command{
		Use:   "status",
		Short: "Print the space taken by each kind of file, and what is reclaimable",
		Long: `Print, for each kind (base-image, store, store-part, instance-disk,
volume-persistent, volume-ephemeral, snapshot, run-dir, logs, other), the
number of files, their apparent size (what ls shows) and the bytes they
really take on disk (st_blocks*512: root disks and volumes are sparse or
copy-on-write), then what "storage reclaim" would remove. With --json, the
same as GET /control/storage answers. Reads only; safe while the node runs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			layout, owners, err := a.storageScope(cmd.Context())
			if err != nil {
				return err
			}
			rep, err := diskusage.Walk(cmd.Context(), layout, owners)
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), rep)
			}
			return printStorage(cmd.OutOrStdout(), rep)
		},
	}
	status.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	var yes, reclaimJSON bool
	reclaim := &cobra.Command{
		Use:   "reclaim",
		Short: "List (or with --yes remove) files no execution record owns",
		Long: `Without --yes, list what would be removed and how many bytes it takes on disk;
nothing is touched. With --yes, remove it. Reclaimable are: the disk
directory of an instance that has no record (erased while the node was
down, or left by a crash), run directories under vms/ of VMs that are gone,
and downloads (.part) untouched for longer than DOWNLOAD_PART_MAX_AGE.
Nothing a record owns (a running or stopped instance, a running program) is
ever removed, nor anything changed in the last 10 minutes (a VM being made),
nor programs' persistent volumes (they outlive the program's VM). Running it
twice removes nothing the second time.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			layout, owners, err := a.storageScope(cmd.Context())
			if err != nil {
				return err
			}
			res, err := diskusage.Reclaim(cmd.Context(), layout, owners, !yes)
			if err != nil {
				return err
			}
			if reclaimJSON {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			return printReclaim(cmd.OutOrStdout(), res)
		},
	}
	reclaim.Flags().BoolVar(&yes, "yes", false, "remove (default: dry run, list only)")
	reclaim.Flags().BoolVar(&reclaimJSON, "json", false, "print JSON")
	for _, c := range []*cobra.Command{status, reclaim} {
		a.bindCommandSettings(c)
	}
	cmd.AddCommand(status, reclaim)
	return cmd
}

// storageLayout is where the node keeps its files.
func storageLayout(cfg config.Config) diskusage.Layout {
	return diskusage.Layout{
		CacheRoot:    cfg.CacheRoot,
		BaseImageDir: baseImageDir(cfg),
		VolumesDir:   filepath.Join(cfg.ExecutionRoot, "volumes"),
		RunDir:       filepath.Join(cfg.ExecutionRoot, "vms"),
		LogsDir:      filepath.Join(cfg.ExecutionRoot, "logs"),
		BackupsDir:   cfg.Backups(),
	}
}

// storageOwners is what the execution records own.
func storageOwners(ctx context.Context, cfg config.Config, records *execution.Records) (diskusage.Owners, error) {
	recs, err := records.List(ctx, "")
	if err != nil {
		return diskusage.Owners{}, fmt.Errorf("list executions: %w", err)
	}
	o := diskusage.Owners{PartMaxAge: cfg.PartMaxAge.Duration()}
	for _, r := range recs {
		run := r.VMDir
		if run == "" && r.Kind == execution.KindProgram {
			run = r.Tap
		}
		o.Executions = append(o.Executions, diskusage.Owner{Ref: r.Ref, Kind: string(r.Kind), RunDir: run})
	}
	return o, nil
}

func (a *app) storageScope(ctx context.Context) (diskusage.Layout, diskusage.Owners, error) {
	database, err := db.Open(ctx, db.Path(a.cfg.ExecutionRoot), a.log)
	if err != nil {
		return diskusage.Layout{}, diskusage.Owners{}, err
	}
	defer database.Close()
	owners, err := storageOwners(ctx, a.cfg.Config, execution.NewRecords(database))
	return storageLayout(a.cfg.Config), owners, err
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStorage(w io.Writer, rep diskusage.Report) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "KIND\tFILES\tAPPARENT\tON DISK\t")
	for _, u := range rep.Kinds {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t\n", u.Kind, u.Files, config.Bytes(u.Apparent).Human(), config.Bytes(u.Allocated).Human())
	}
	fmt.Fprintf(tw, "total\t\t%s\t%s\t\n", config.Bytes(rep.Apparent).Human(), config.Bytes(rep.Allocated).Human())
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "reclaimable: %d items, %s on disk (alephvm storage reclaim)\n",
		len(rep.Reclaimable), config.Bytes(rep.ReclaimableBytes).Human())
	return err
}

func printReclaim(w io.Writer, res diskusage.Result) error {
	verb := "removed"
	if res.DryRun {
		verb = "would remove"
	}
	for _, it := range res.Items {
		fmt.Fprintf(w, "%s %s (%s, %s on disk): %s\n", verb, it.Path, it.Kind, config.Bytes(it.Allocated).Human(), it.Reason)
	}
	n := len(res.Items)
	if !res.DryRun {
		n = res.Removed
	}
	_, err := fmt.Fprintf(w, "%s %d items, %s\n", verb, n, config.Bytes(res.Freed).Human())
	if err == nil && res.DryRun && n > 0 {
		_, err = fmt.Fprintln(w, "dry run: nothing removed; run with --yes to remove")
	}
	return err
}

// storageAPI serves /control/storage from the node's records.
type storageAPI struct {
	cfg     config.Config
	records *execution.Records
}

func (s storageAPI) Status(ctx context.Context) (diskusage.Report, error) {
	o, err := storageOwners(ctx, s.cfg, s.records)
	if err != nil {
		return diskusage.Report{}, err
	}
	return diskusage.Walk(ctx, storageLayout(s.cfg), o)
}

func (s storageAPI) Reclaim(ctx context.Context, dryRun bool) (diskusage.Result, error) {
	o, err := storageOwners(ctx, s.cfg, s.records)
	if err != nil {
		return diskusage.Result{}, err
	}
	return diskusage.Reclaim(ctx, storageLayout(s.cfg), o, dryRun)
}
