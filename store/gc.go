package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/alephvm/alephvm/message"
)

// SweepInterval is how often a running node collects the store's garbage.
const SweepInterval = 10 * time.Minute

// GCResult says what a GC found and freed.
type GCResult struct {
	Evicted  int   // downloaded files evicted to get under the size limit
	InUse    int   // files that would have been evicted but are pinned
	Parts    int   // abandoned .part files removed
	Orphans  int   // files on disk the index did not know, removed
	Messages int   // messages nothing needs, forgotten
	Freed    int64 // bytes of files freed in all
	Size     int64 // total size of the files kept
}

// Sweep runs GC with Options.MaxSize every interval until ctx ends, so
// that a running node collects abandoned downloads and unused messages
// by itself.
func (s *Store) Sweep(ctx context.Context, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		res, err := s.GC(ctx, s.opts.MaxSize)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			s.log.Error("store sweep", "err", err)
		case res.Evicted+res.Parts+res.Orphans+res.Messages > 0:
			s.log.Info("store sweep", "evicted", res.Evicted, "parts", res.Parts, "orphans", res.Orphans,
				"messages", res.Messages, "freed", res.Freed, "size", res.Size, "in_use", res.InUse)
		}
	}
}

// GC removes abandoned .part files (interrupted additions, and downloads
// no one has written to for Options.PartMaxAge), files the index does not
// know, and messages nothing needs (see collectMessages); then it evicts
// downloaded files, least recently used first, until the files kept take
// at most maxSize bytes (0: no limit). Pinned files and files added
// locally are never evicted.
func (s *Store) GC(ctx context.Context, maxSize int64) (GCResult, error) {
	var res GCResult
	parts, err := os.ReadDir(s.tmp)
	if err != nil {
		return res, fmt.Errorf("gc: %w", err)
	}
	for _, e := range parts {
		info, err := e.Info()
		if err != nil || !strings.HasSuffix(e.Name(), ".part") {
			continue
		}
		// An interrupted addition cannot be resumed; a download can, for a while.
		abandoned := strings.HasPrefix(e.Name(), "add-") || time.Since(info.ModTime()) > s.opts.PartMaxAge
		if abandoned && s.removeUnlocked(filepath.Join(s.tmp, e.Name()), nil) {
			res.Parts++
			res.Freed += info.Size()
		}
	}

	indexed := map[string]bool{}
	rows, err := s.db.QueryContext(ctx, `SELECT DISTINCT sha256 FROM store_files`)
	if err != nil {
		return res, fmt.Errorf("gc: list files: %w", err)
	}
	for rows.Next() {
		var sha string
		if err := rows.Scan(&sha); err != nil {
			rows.Close()
			return res, fmt.Errorf("gc: list files: %w", err)
		}
		indexed[sha] = true
	}
	if err := errors.Join(rows.Err(), rows.Close()); err != nil {
		return res, fmt.Errorf("gc: list files: %w", err)
	}
	blobs, err := os.ReadDir(s.files)
	if err != nil {
		return res, fmt.Errorf("gc: %w", err)
	}
	onDisk := map[string]bool{}
	for _, e := range blobs {
		onDisk[e.Name()] = true
		if indexed[e.Name()] {
			continue
		}
		info, err := e.Info()
		// A blob being committed is locked by its writer until indexed; one
		// committed since the index was read is indexed by now.
		unindexed := func() bool {
			var n int
			err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM store_files WHERE sha256 = ?`, e.Name()).Scan(&n)
			return err == nil && n == 0
		}
		if err == nil && s.removeUnlocked(filepath.Join(s.files, e.Name()), unindexed) {
			res.Orphans++
			res.Freed += info.Size()
		}
	}
	for sha := range indexed {
		if !onDisk[sha] {
			s.log.Warn("indexed file missing, forgetting it", "sha256", sha)
			if err := s.forget(ctx, sha); err != nil {
				return res, fmt.Errorf("gc: %w", err)
			}
		}
	}

	if res.Messages, err = s.collectMessages(ctx); err != nil {
		return res, fmt.Errorf("gc: %w", err)
	}

	ev, err := s.evict(ctx, maxSize, "")
	res.Evicted, res.InUse, res.Size = ev.Evicted, ev.InUse, ev.Size
	res.Freed += ev.Freed
	return res, err
}

// collectMessages forgets the messages fetched from the network more than
// Options.MessageMaxAge ago that nothing needs: needed are the messages of
// the executions the node records (table executions, whatever their
// state), the messages theirs refer to (code, runtime, data, volumes,
// parent images, firmware) and the amends of those, and the STORE messages
// naming a file the store holds. Messages kept locally (store add, message
// add) cannot be fetched again and are never forgotten. A message
// forgotten is fetched again when next asked for.
func (s *Store) collectMessages(ctx context.Context) (int, error) {
	needed, err := s.neededMessages(ctx)
	if err != nil {
		return 0, err
	}
	before := time.Now().Add(-s.opts.MessageMaxAge).UnixNano()
	rows, err := s.db.QueryContext(ctx, `SELECT item_hash, ref FROM store_messages
		WHERE local = 0 AND stored_at < ?
		AND (file_hash IS NULL OR file_hash NOT IN (SELECT item_hash FROM store_files))`, before)
	if err != nil {
		return 0, fmt.Errorf("list messages: %w", err)
	}
	var unused []message.ItemHash
	for rows.Next() {
		var hash message.ItemHash
		var ref sql.NullString
		if err := rows.Scan(&hash, &ref); err != nil {
			rows.Close()
			return 0, fmt.Errorf("list messages: %w", err)
		}
		if !needed[hash] && !(ref.Valid && needed[message.ItemHash(ref.String)]) {
			unused = append(unused, hash)
		}
	}
	if err := errors.Join(rows.Err(), rows.Close()); err != nil {
		return 0, fmt.Errorf("list messages: %w", err)
	}
	forgotten := 0
	for _, hash := range unused {
		// Checked again as it goes: an execution recorded since the list
		// was made keeps its message.
		r, err := s.db.ExecContext(ctx, `DELETE FROM store_messages WHERE item_hash = ? AND local = 0
			AND NOT EXISTS (SELECT 1 FROM executions WHERE executions.item_hash = store_messages.item_hash)
			AND (file_hash IS NULL OR file_hash NOT IN (SELECT item_hash FROM store_files))`, hash)
		if err != nil {
			return forgotten, fmt.Errorf("forget message %s: %w", hash, err)
		}
		if n, _ := r.RowsAffected(); n > 0 {
			forgotten++
		}
	}
	return forgotten, nil
}

// neededMessages lists the messages of the recorded executions and the
// messages they refer to.
func (s *Store) neededMessages(ctx context.Context) (map[message.ItemHash]bool, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT e.item_hash, m.raw FROM executions e
		LEFT JOIN store_messages m ON m.item_hash = e.item_hash`)
	if err != nil {
		return nil, fmt.Errorf("list executions: %w", err)
	}
	defer rows.Close()
	needed := map[message.ItemHash]bool{}
	for rows.Next() {
		var hash message.ItemHash
		var raw []byte
		if err := rows.Scan(&hash, &raw); err != nil {
			return nil, fmt.Errorf("list executions: %w", err)
		}
		needed[hash] = true
		if raw == nil {
			continue
		}
		msg, err := message.Parse(raw)
		if err != nil {
			s.log.Warn("gc: a recorded execution's message does not parse", "item", hash, "err", err)
			continue
		}
		for _, ref := range refsOf(msg.Content) {
			needed[ref] = true
		}
	}
	return needed, rows.Err()
}

// refsOf lists the STORE messages an executable message refers to.
func refsOf(content message.Content) []message.ItemHash {
	var refs []message.ItemHash
	switch c := content.(type) {
	case *message.ProgramContent:
		refs = append(refs, c.Code.Ref, c.Runtime.Ref)
		if c.Data != nil {
			refs = append(refs, c.Data.Ref)
		}
	case *message.InstanceContent:
		refs = append(refs, c.Rootfs.Parent.Ref)
	}
	if exe, ok := content.(message.ExecutableContent); ok {
		for _, v := range exe.Executable().Volumes {
			refs = append(refs, v.Ref)
			if v.Parent != nil {
				refs = append(refs, v.Parent.Ref)
			}
		}
		if tee := exe.Env().TrustedExecution; tee != nil && tee.Firmware != nil {
			refs = append(refs, *tee.Firmware)
		}
	}
	return refs
}

// removeUnlocked removes path unless someone holds a lock on it or, once
// the lock is taken, removable (if set) returns false.
func (s *Store) removeUnlocked(path string, removable func() bool) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	if ok, _ := tryLockExclusive(f); !ok || !stillAt(f) || (removable != nil && !removable()) {
		return false
	}
	if err := os.Remove(path); err != nil {
		s.log.Warn("gc: remove", "path", path, "err", err)
		return false
	}
	return true
}

// Size is what the store's files take, in bytes, added locally or
// downloaded.
func (s *Store) Size(ctx context.Context) (int64, error) {
	var size int64
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(SUM(size), 0) FROM
		(SELECT MAX(size) AS size FROM store_files GROUP BY sha256)`).Scan(&size)
	if err != nil {
		return 0, fmt.Errorf("store size: %w", err)
	}
	return size, nil
}

// evict removes downloaded files, least recently used first, until the
// files kept take at most maxSize bytes. keep is the sha256 of a file just
// downloaded, not yet pinned by the caller waiting for it.
func (s *Store) evict(ctx context.Context, maxSize int64, keep string) (GCResult, error) {
	var res GCResult
	var err error
	res.Size, err = s.Size(ctx)
	if err != nil || maxSize <= 0 || res.Size <= maxSize {
		return res, err
	}
	type candidate struct {
		sha  string
		size int64
	}
	var candidates []candidate
	rows, err := s.db.QueryContext(ctx, `SELECT sha256, MAX(size) FROM store_files
		GROUP BY sha256 HAVING MAX(local) = 0 ORDER BY MAX(last_used)`)
	if err != nil {
		return res, fmt.Errorf("evict: %w", err)
	}
	for rows.Next() {
		var c candidate
		if err := rows.Scan(&c.sha, &c.size); err != nil {
			rows.Close()
			return res, fmt.Errorf("evict: %w", err)
		}
		candidates = append(candidates, c)
	}
	if err := errors.Join(rows.Err(), rows.Close()); err != nil {
		return res, fmt.Errorf("evict: %w", err)
	}
	for _, c := range candidates {
		if res.Size <= maxSize {
			break
		}
		if c.sha == keep {
			continue
		}
		evicted, err := s.evictOne(ctx, c.sha)
		if err != nil {
			return res, err
		}
		if !evicted {
			res.InUse++
			continue
		}
		s.log.Info("evicted", "sha256", c.sha, "size", c.size)
		s.opts.Events.Evicted(c.size)
		res.Evicted++
		res.Freed += c.size
		res.Size -= c.size
	}
	return res, nil
}

// evictOne removes a blob and its index rows unless it is pinned.
func (s *Store) evictOne(ctx context.Context, sha string) (bool, error) {
	path := s.blobPath(sha)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return true, s.forget(ctx, sha)
	} else if err != nil {
		return false, fmt.Errorf("evict %s: %w", sha, err)
	}
	defer f.Close()
	if ok, err := tryLockExclusive(f); !ok || !stillAt(f) {
		return false, err
	}
	// Forget first: a pin that read the row waits for our lock, then sees
	// the file gone and downloads it again.
	if err := s.forget(ctx, sha); err != nil {
		return false, err
	}
	if err := os.Remove(path); err != nil {
		return false, fmt.Errorf("evict %s: %w", sha, err)
	}
	return true, nil
}

func (s *Store) evictAfterDownload(ctx context.Context, keep string) {
	if s.opts.MaxSize <= 0 {
		return
	}
	res, err := s.evict(ctx, s.opts.MaxSize, keep)
	if err != nil {
		s.log.Error("evict after download", "err", err)
	} else if res.Size > s.opts.MaxSize {
		s.log.Warn("store over its size limit: the rest is in use or added locally", "size", res.Size, "limit", s.opts.MaxSize, "in_use", res.InUse)
	}
}
