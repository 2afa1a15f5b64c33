package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// PartMaxAge is how long GC keeps a .part file no one is writing, so that
// a download interrupted by a restart can still resume.
const PartMaxAge = 24 * time.Hour

// GCResult says what a GC found and freed.
type GCResult struct {
	Evicted int   // downloaded files evicted to get under the size limit
	InUse   int   // files that would have been evicted but are pinned
	Parts   int   // abandoned .part files removed
	Orphans int   // files on disk the index did not know, removed
	Freed   int64 // bytes freed in all
	Size    int64 // total size of the files kept
}

// GC removes abandoned .part files and files the index does not know, then
// evicts downloaded files, least recently used first, until the files kept
// take at most maxSize bytes (0: no limit). Pinned files and files added
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
		abandoned := strings.HasPrefix(e.Name(), "add-") || time.Since(info.ModTime()) > PartMaxAge
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

	ev, err := s.evict(ctx, maxSize, "")
	res.Evicted, res.InUse, res.Size = ev.Evicted, ev.InUse, ev.Size
	res.Freed += ev.Freed
	return res, err
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

// evict removes downloaded files, least recently used first, until the
// files kept take at most maxSize bytes. keep is the sha256 of a file just
// downloaded, not yet pinned by the caller waiting for it.
func (s *Store) evict(ctx context.Context, maxSize int64, keep string) (GCResult, error) {
	var res GCResult
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(SUM(size), 0) FROM
		(SELECT MAX(size) AS size FROM store_files GROUP BY sha256)`).Scan(&res.Size)
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
