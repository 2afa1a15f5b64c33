package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/store"
)

func newStoreCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "store",
		Short: "Add files to the content store, fetch them, collect garbage",
		Long: `The content store keeps the files VMs are built from (code, runtimes, volumes,
base images) under CACHE_ROOT, by sha256, and the messages that name them in
the node's database under EXECUTION_ROOT. A ref is the item hash of a STORE
message; its content.item_hash names the file. See docs/store.md.`,
	}
	add := &cobra.Command{
		Use:   "add FILE",
		Short: "Copy a file into the store and print the ref to use in a message",
		Long: `Copy FILE into the store, hashing it on the way, and create a local STORE
message naming it (unsigned, marked local). Prints the message's item hash,
the ref to put in a PROGRAM or INSTANCE message, then the file's sha256 and
size:

  ref     <item hash of the STORE message>
  sha256  <sha256 of the file>
  size    <bytes>

Adding the same bytes again prints the same ref. Files added this way are
never evicted.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				added, err := s.AddFile(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "ref     %s\nsha256  %s\nsize    %d\n", added.Ref, added.SHA256, added.Size)
				return err
			})
		},
	}
	var output string
	var latest bool
	get := &cobra.Command{
		Use:   "get REF -o FILE",
		Short: "Write the file a STORE message names",
		Long: `Write the file named by the STORE message REF to FILE (- for standard output).
The message and the file are looked up in the store first, then fetched from
API_SERVER (or IPFS_GATEWAY for IPFS items) when those are set; a download is
verified against its sha256 before it is kept, and resumes where it stopped
if interrupted. With --latest, REF is first replaced by its latest amend by
the same owner, as use_latest does. Progress is shown on standard error when
it is a terminal.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output == "" {
				return errors.New("say where to write the file with -o FILE (- for standard output)")
			}
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				item, err := s.Fetch(cmd.Context(), message.ItemHash(args[0]), latest)
				if err != nil {
					return err
				}
				defer item.Release()
				if !item.Verified {
					a.log.Warn("this IPFS item was not verified against its CID", "item", item.FileHash, "sha256", item.SHA256)
				}
				return copyOut(item.Path, output, cmd.OutOrStdout())
			})
		},
	}
	get.Flags().StringVarP(&output, "output", "o", "", "file to write (- for standard output)")
	get.Flags().BoolVar(&latest, "latest", false, "use the latest amend of REF by its owner (use_latest)")
	var maxSize string
	gc := &cobra.Command{
		Use:   "gc",
		Short: "Remove leftovers and evict downloaded files past the size limit",
		Long: `Remove abandoned .part files (interrupted additions; downloads untouched for
DOWNLOAD_PART_MAX_AGE, which could otherwise still resume), files the index
does not know and messages fetched from the network more than
STORE_MESSAGE_MAX_AGE ago that no execution, cached file or local message
needs; then evict downloaded files, least recently used first, until the
store holds at most --max-size bytes (CACHE_MAX_SIZE by default; 0: no
limit). Files in use by a VM and files added with "store add" are never
evicted. Safe to run while the node runs, which does the same every 10
minutes by itself.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			limit := a.cfg.CacheMaxSize
			if cmd.Flags().Changed("max-size") {
				if err := limit.UnmarshalText([]byte(maxSize)); err != nil {
					return fmt.Errorf("--max-size: %w", err)
				}
			}
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				res, err := s.GC(cmd.Context(), int64(limit))
				if err != nil {
					return err
				}
				summary := fmt.Sprintf("evicted %d files, removed %d .part files and %d unindexed files, forgot %d unused messages, freed %s; %s kept",
					res.Evicted, res.Parts, res.Orphans, res.Messages, config.Bytes(res.Freed).Human(), config.Bytes(res.Size).Human())
				if res.InUse > 0 {
					summary += fmt.Sprintf("; %d files that would have been evicted are in use", res.InUse)
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), summary)
				return err
			})
		},
	}
	gc.Flags().StringVar(&maxSize, "max-size", "", "size limit for this run, such as 20GiB (default CACHE_MAX_SIZE)")
	for _, c := range []*cobra.Command{add, get, gc} {
		a.bindCommandSettings(c)
	}
	cmd.AddCommand(add, get, gc)
	return cmd
}

// withStore opens the node's database and content store for fn.
func (a *app) withStore(ctx context.Context, fn func(*store.Store) error) error {
	return a.withStoreDB(ctx, func(s *store.Store, _ *sql.DB) error { return fn(s) })
}

// withStoreDB opens the node's database and content store for fn, which
// is given both.
func (a *app) withStoreDB(ctx context.Context, fn func(*store.Store, *sql.DB) error) error {
	database, err := db.Open(ctx, db.Path(a.cfg.ExecutionRoot), a.log)
	if err != nil {
		return err
	}
	defer database.Close()
	opts := store.Options{
		Root:          a.cfg.CacheRoot,
		DB:            database,
		APIServer:     a.cfg.APIServer,
		IPFSGateway:   a.cfg.IPFSGateway,
		MaxSize:       int64(a.cfg.CacheMaxSize),
		StallTimeout:  a.cfg.StallTimeout.Duration(),
		Log:           a.log,
		MaxItemSize:   int64(a.cfg.MaxItemSize),
		MinFreeSpace:  int64(a.cfg.MinFreeSpace),
		PartMaxAge:    a.cfg.PartMaxAge.Duration(),
		MessageMaxAge: a.cfg.MessageMaxAge.Duration(),
	}
	if f, ok := a.stderr.(*os.File); ok && isTerminal(f) {
		p := &progressLine{w: f}
		defer p.finish()
		opts.Progress = p.show
	}
	s, err := store.Open(ctx, opts)
	if err != nil {
		return err
	}
	return fn(s, database)
}

// copyOut copies a stored file to path, or to stdout for "-".
func copyOut(from, path string, stdout io.Writer) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	if path == "-" {
		_, err := io.Copy(stdout, src)
		return err
	}
	dst, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil { // copy_file_range: no bytes through user space
		dst.Close()
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return dst.Close()
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// progressLine redraws one line on a terminal, at most four times a second.
type progressLine struct {
	w     io.Writer
	mu    sync.Mutex
	last  time.Time
	drawn bool
}

func (p *progressLine) show(pr store.Progress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.last) < 250*time.Millisecond && pr.Done != pr.Total {
		return
	}
	p.last, p.drawn = time.Now(), true
	item := string(pr.Item)
	if len(item) > 12 {
		item = item[:12] + "…"
	}
	if pr.Total > 0 {
		fmt.Fprintf(p.w, "\r\033[Kdownloading %s  %s / %s  %3d%%", item, config.Bytes(pr.Done).Human(), config.Bytes(pr.Total).Human(), pr.Done*100/pr.Total)
	} else {
		fmt.Fprintf(p.w, "\r\033[Kdownloading %s  %s", item, config.Bytes(pr.Done).Human())
	}
}

func (p *progressLine) finish() {
	if p.drawn {
		fmt.Fprintln(p.w)
	}
}
