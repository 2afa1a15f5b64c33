// Package diskusage accounts the node's disk space by kind (base images,
// the content store, instance root disks, volumes, run directories, logs)
// and finds what no record owns, so that it can be reclaimed.
//
// Space is counted twice: the apparent size (what ls shows) and the
// allocated bytes (st_blocks*512), since root disks and volumes are sparse
// or copy-on-write and take far less than their size.
//
// Layout walked (docs/storage.md):
//
//	CACHE_ROOT/files/<sha256>          content store (base images, layers, code, volumes)
//	CACHE_ROOT/tmp/*.part              downloads under way
//	CACHE_ROOT/base-image/             built base image (kernel, initramfs, disk)
//	EXECUTION_ROOT/volumes/<ref>/      an instance's root disk (inst-*) and volumes; a program's persistent volumes
//	EXECUTION_ROOT/vms/<name>/         run directories (ephemeral-*.ext4 are ephemeral volumes)
//	EXECUTION_ROOT/logs/               stopped programs' output
//	EXECUTION_ROOT/backups/            instances' backups (BACKUP_DIRECTORY)
package diskusage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/alephvm/alephvm/message"
)

// The kinds of space.
const (
	KindBaseImage    = "base-image"
	KindStore        = "store"
	KindStorePart    = "store-part"
	KindUnpacked     = "unpacked-image" // compressed base images unpacked (CACHE_ROOT/unpacked)
	KindInstanceDisk = "instance-disk"
	KindVolume       = "volume-persistent"
	KindEphemeral    = "volume-ephemeral"
	KindSnapshot     = "snapshot"
	KindBackup       = "backup" // instances' backups (package backup)
	KindRunDir       = "run-dir"
	KindLogs         = "logs"
	KindUnknown      = "other"
)

// Kinds lists the kinds in the order they are reported.
var kinds = []string{KindBaseImage, KindStore, KindStorePart, KindUnpacked, KindInstanceDisk, KindVolume, KindEphemeral,
	KindSnapshot, KindBackup, KindRunDir, KindLogs, KindUnknown}

// Layout names the node's directories.
type Layout struct {
	CacheRoot    string // content store: files/, tmp/
	BaseImageDir string // built base image
	VolumesDir   string // EXECUTION_ROOT/volumes
	RunDir       string // EXECUTION_ROOT/vms
	LogsDir      string // EXECUTION_ROOT/logs
	BackupsDir   string // BACKUP_DIRECTORY
}

// Owner is an execution record as the accounting sees it.
type Owner struct {
	Ref    message.ItemHash
	Kind   string // "program" or "instance"
	RunDir string // its run directory's name (or path) under RunDir, if any
}

// Owners is what records own: nothing they name is ever reclaimed.
type Owners struct {
	Executions []Owner
	// PartMaxAge: a .part file untouched for longer is stale (reclaimable).
	PartMaxAge time.Duration
	// MinAge: nothing modified more recently is reclaimable (a VM being
	// made before its record is written). Zero means 10 minutes.
	MinAge time.Duration
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// Usage is the space of one kind.
type Usage struct {
	Kind      string `json:"kind"`
	Files     int    `json:"files"`
	Apparent  int64  `json:"apparent_bytes"`
	Allocated int64  `json:"allocated_bytes"`
}

// Item is one thing no record owns, that Reclaim removes.
type Item struct {
	Path      string `json:"path"`
	Kind      string `json:"kind"`
	Reason    string `json:"reason"`
	Apparent  int64  `json:"apparent_bytes"`
	Allocated int64  `json:"allocated_bytes"`
}

// Report is the node's disk space.
type Report struct {
	Kinds       []Usage `json:"kinds"`
	Apparent    int64   `json:"apparent_bytes"`
	Allocated   int64   `json:"allocated_bytes"`
	Reclaimable []Item  `json:"reclaimable"`
	// ReclaimableBytes is the allocated bytes Reclaim would free.
	ReclaimableBytes int64 `json:"reclaimable_bytes"`
}

type sizes struct {
	files               int
	apparent, allocated int64
}

func (s *sizes) add(o sizes) {
	s.files += o.files
	s.apparent += o.apparent
	s.allocated += o.allocated
}

// measure sums the regular files under path (a file or a directory),
// never following symbolic links.
func measure(path string) (sizes, time.Time, error) {
	var s sizes
	var newest time.Time
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if info.ModTime().After(newest) {
			newest = info.ModTime()
		}
		if !info.Mode().IsRegular() {
			return nil
		}
		s.files++
		s.apparent += info.Size()
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			s.allocated += st.Blocks * 512
		}
		return nil
	})
	return s, newest, err
}

// Walk measures the node's directories and finds what is reclaimable.
// Missing directories count as empty.
func Walk(ctx context.Context, l Layout, o Owners) (Report, error) {
	now := time.Now
	if o.Now != nil {
		now = o.Now
	}
	minAge := o.MinAge
	if minAge == 0 {
		minAge = 10 * time.Minute
	}
	old := func(t time.Time, age time.Duration) bool { return now().Sub(t) > age }
	totals := map[string]*sizes{}
	for _, k := range kinds {
		totals[k] = &sizes{}
	}
	var rep Report
	add := func(kind string, s sizes) {
		t := totals[kind]
		t.files += s.files
		t.apparent += s.apparent
		t.allocated += s.allocated
	}
	reclaim := func(path, kind, reason string, s sizes) {
		rep.Reclaimable = append(rep.Reclaimable, Item{Path: path, Kind: kind, Reason: reason, Apparent: s.apparent, Allocated: s.allocated})
		rep.ReclaimableBytes += s.allocated
	}
	walkDir := func(dir, kind string) error {
		if dir == "" {
			return nil
		}
		s, _, err := measure(dir)
		if err != nil {
			return fmt.Errorf("measure %s: %w", dir, err)
		}
		add(kind, s)
		return nil
	}
	if err := walkDir(l.BaseImageDir, KindBaseImage); err != nil {
		return rep, err
	}
	if err := walkDir(l.BackupsDir, KindBackup); err != nil {
		return rep, err
	}
	if l.CacheRoot != "" {
		if err := walkDir(filepath.Join(l.CacheRoot, "files"), KindStore); err != nil {
			return rep, err
		}
		// Unpacked images are shared with the instances that link them:
		// measured here once; the node collects those no instance uses.
		if err := walkDir(filepath.Join(l.CacheRoot, "unpacked"), KindUnpacked); err != nil {
			return rep, err
		}
		tmp := filepath.Join(l.CacheRoot, "tmp")
		entries, err := readDir(tmp)
		if err != nil {
			return rep, err
		}
		for _, e := range entries {
			p := filepath.Join(tmp, e.Name())
			s, mod, err := measure(p)
			if err != nil {
				return rep, fmt.Errorf("measure %s: %w", p, err)
			}
			add(KindStorePart, s)
			if e.Type().IsRegular() && strings.HasSuffix(e.Name(), ".part") && o.PartMaxAge > 0 &&
				old(mod, max(o.PartMaxAge, minAge)) {
				reclaim(p, KindStorePart, "download untouched for longer than DOWNLOAD_PART_MAX_AGE", s)
			}
		}
	}
	byRef := map[string]Owner{}
	runDirs := map[string]bool{}
	for _, ex := range o.Executions {
		byRef[string(ex.Ref)] = ex
		if ex.RunDir != "" {
			runDirs[filepath.Base(ex.RunDir)] = true
		}
		if ex.Kind == "instance" && len(ex.Ref) >= 16 {
			runDirs["i-"+string(ex.Ref)[:16]] = true
		}
	}
	if l.VolumesDir != "" {
		entries, err := readDir(l.VolumesDir)
		if err != nil {
			return rep, err
		}
		for _, e := range entries {
			dir := filepath.Join(l.VolumesDir, e.Name())
			if !e.IsDir() {
				s, _, err := measure(dir)
				if err != nil {
					return rep, err
				}
				add(KindUnknown, s)
				continue
			}
			files, err := readDir(dir)
			if err != nil {
				return rep, err
			}
			var all sizes
			var newest time.Time
			hasInstanceDisk := false
			for _, f := range files {
				p := filepath.Join(dir, f.Name())
				s, mod, err := measure(p)
				if err != nil {
					return rep, fmt.Errorf("measure %s: %w", p, err)
				}
				if mod.After(newest) {
					newest = mod
				}
				kind := KindVolume
				switch {
				case strings.HasPrefix(f.Name(), "inst-"):
					kind, hasInstanceDisk = KindInstanceDisk, true
				case strings.Contains(f.Name(), "snapshot") || strings.HasSuffix(f.Name(), ".snap") ||
					strings.HasPrefix(f.Name(), "rootfs.pre-restore-"):
					kind = KindSnapshot
				case strings.HasSuffix(f.Name(), ".part"):
					kind = KindUnknown
				}
				add(kind, s)
				all.add(s)
			}
			_, owned := byRef[e.Name()]
			if !owned && hasInstanceDisk && old(newest, minAge) {
				reclaim(dir, KindInstanceDisk, "instance disks with no record (the instance was erased)", all)
			}
		}
	}
	if l.RunDir != "" {
		entries, err := readDir(l.RunDir)
		if err != nil {
			return rep, err
		}
		for _, e := range entries {
			dir := filepath.Join(l.RunDir, e.Name())
			files, err := readDir(dir)
			if err != nil && e.IsDir() {
				return rep, err
			}
			var all sizes
			var newest time.Time
			if !e.IsDir() {
				files = nil
				s, mod, err := measure(dir)
				if err != nil {
					return rep, err
				}
				add(KindRunDir, s)
				all, newest = s, mod
			}
			for _, f := range files {
				p := filepath.Join(dir, f.Name())
				s, mod, err := measure(p)
				if err != nil {
					return rep, fmt.Errorf("measure %s: %w", p, err)
				}
				if mod.After(newest) {
					newest = mod
				}
				kind := KindRunDir
				if strings.HasPrefix(f.Name(), "ephemeral-") {
					kind = KindEphemeral
				}
				add(kind, s)
				all.add(s)
			}
			if !runDirs[e.Name()] && e.IsDir() && old(newest, minAge) {
				reclaim(dir, KindRunDir, "run directory of a VM that is gone", all)
			}
		}
	}
	if err := walkDir(l.LogsDir, KindLogs); err != nil {
		return rep, err
	}
	for _, k := range kinds {
		t := totals[k]
		rep.Kinds = append(rep.Kinds, Usage{Kind: k, Files: t.files, Apparent: t.apparent, Allocated: t.allocated})
		rep.Apparent += t.apparent
		rep.Allocated += t.allocated
	}
	sort.Slice(rep.Reclaimable, func(i, j int) bool { return rep.Reclaimable[i].Path < rep.Reclaimable[j].Path })
	return rep, ctx.Err()
}

func readDir(dir string) ([]fs.DirEntry, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", dir, err)
	}
	return entries, nil
}

// Result is what Reclaim did (or would do, in a dry run).
type Result struct {
	DryRun  bool   `json:"dry_run"`
	Items   []Item `json:"items"`
	Freed   int64  `json:"freed_bytes"`
	Removed int    `json:"removed"`
}

// Reclaim walks again and removes what is reclaimable, or only lists it
// when dryRun. What a record owns is never touched; running it twice
// removes nothing the second time.
func Reclaim(ctx context.Context, l Layout, o Owners, dryRun bool) (Result, error) {
	rep, err := Walk(ctx, l, o)
	if err != nil {
		return Result{}, err
	}
	res := Result{DryRun: dryRun, Items: rep.Reclaimable}
	if res.Items == nil {
		res.Items = []Item{}
	}
	for _, it := range rep.Reclaimable {
		if dryRun {
			res.Freed += it.Allocated
			continue
		}
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if !within(it.Path, l) {
			return res, fmt.Errorf("refuse to remove %s: outside the node's directories", it.Path)
		}
		if err := os.RemoveAll(it.Path); err != nil {
			return res, fmt.Errorf("remove %s: %w", it.Path, err)
		}
		res.Freed += it.Allocated
		res.Removed++
	}
	return res, nil
}

// within tells whether p lies strictly inside one of the layout's
// directories (a last check before a removal).
func within(p string, l Layout) bool {
	for _, d := range []string{filepath.Join(l.CacheRoot, "tmp"), l.VolumesDir, l.RunDir} {
		if d == "" || d == "." {
			continue
		}
		rel, err := filepath.Rel(d, p)
		if err == nil && rel != "." && !strings.HasPrefix(rel, "..") && !strings.Contains(rel, string(filepath.Separator)) {
			return true
		}
	}
	return false
}

// ErrNoSpace is what a refusal for lack of disk space is (errors.Is); the
// API answers 507 Insufficient Storage.
var ErrNoSpace = errors.New("insufficient storage")

// Space checks that the disks of a new VM fit on the volumes' filesystem.
type Space struct {
	// Free returns the bytes free in the filesystem holding dir (nil:
	// storage.StatfsFree).
	Free func(dir string) (int64, error)
	// Reserve is kept free for the host.
	Reserve int64
}

// Check refuses what (named in the error) whose disks may take need bytes
// in dir, when the filesystem's free space less the reserve and less what
// running VMs were promised (their disks' sizes less what their sparse
// files already take) cannot hold it.
func (s Space) Check(dir, what string, need, promised int64) error {
	if need <= 0 {
		return nil
	}
	if s.Free == nil {
		return errors.New("diskusage: no free-space source")
	}
	free, err := s.Free(dir)
	if err != nil {
		return fmt.Errorf("free space of %s: %w", dir, err)
	}
	left := free - s.Reserve - max(promised, 0)
	if need > left {
		return fmt.Errorf("%w: %s needs %d MiB of disk; the node's disk has %d MiB free, %d MiB promised to running VMs and %d MiB kept for the host",
			ErrNoSpace, what, need>>20, max(free, 0)>>20, max(promised, 0)>>20, s.Reserve>>20)
	}
	return nil
}
