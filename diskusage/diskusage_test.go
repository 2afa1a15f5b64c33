package diskusage

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/message"
)

const (
	refA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	refB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	refC = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
)

// sparse makes a file of size bytes holding data bytes written at its start.
func sparse(t *testing.T, path string, size, data int64) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if data > 0 {
		if _, err := f.Write(make([]byte, data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func age(t *testing.T, path string, d time.Duration) {
	t.Helper()
	old := time.Now().Add(-d)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
}

// tree makes a node: refA an instance with a record, refB an instance
// erased (disks left), refC a program's volume with no record.
func tree(t *testing.T) (Layout, Owners) {
	root := t.TempDir()
	l := Layout{CacheRoot: filepath.Join(root, "cache"), BaseImageDir: filepath.Join(root, "cache", "base-image"),
		VolumesDir: filepath.Join(root, "exec", "volumes"), RunDir: filepath.Join(root, "exec", "vms"), LogsDir: filepath.Join(root, "exec", "logs")}
	sparse(t, filepath.Join(l.BaseImageDir, "disk.raw"), 64<<20, 1<<20)
	sparse(t, filepath.Join(l.CacheRoot, "files", "f1"), 1<<20, 1<<20)
	sparse(t, filepath.Join(l.CacheRoot, "tmp", "old.part"), 1<<20, 1<<20)
	age(t, filepath.Join(l.CacheRoot, "tmp", "old.part"), 48*time.Hour)
	sparse(t, filepath.Join(l.CacheRoot, "tmp", "new.part"), 1<<20, 1<<20)
	sparse(t, filepath.Join(l.VolumesDir, refA, "inst-aaaaaaaaaaaaaaaa.qcow2"), 1<<30, 256<<10)
	sparse(t, filepath.Join(l.VolumesDir, refA, "data.ext4"), 100<<20, 64<<10)
	for _, f := range []string{"inst-bbbbbbbbbbbbbbbb.qcow2", "vol.ext4"} {
		p := filepath.Join(l.VolumesDir, refB, f)
		sparse(t, p, 1<<30, 128<<10)
		age(t, p, time.Hour)
	}
	sparse(t, filepath.Join(l.VolumesDir, refC, "data.ext4"), 1<<30, 128<<10)
	age(t, filepath.Join(l.VolumesDir, refC, "data.ext4"), time.Hour)
	sparse(t, filepath.Join(l.RunDir, "i-aaaaaaaaaaaaaaaa", "console.log"), 4096, 4096)
	sparse(t, filepath.Join(l.RunDir, "tap7", "ephemeral-0.ext4"), 512<<20, 64<<10)
	sparse(t, filepath.Join(l.RunDir, "tap9", "ephemeral-0.ext4"), 512<<20, 64<<10)
	age(t, filepath.Join(l.RunDir, "tap9", "ephemeral-0.ext4"), time.Hour)
	sparse(t, filepath.Join(l.RunDir, "tap8", "ephemeral-0.ext4"), 512<<20, 64<<10) // young: kept
	sparse(t, filepath.Join(l.LogsDir, "x.log"), 100, 100)
	o := Owners{Executions: []Owner{{Ref: refA, Kind: "instance"}, {Ref: message.ItemHash(strings.Repeat("d", 64)), Kind: "program", RunDir: "tap7"}},
		PartMaxAge: 24 * time.Hour}
	return l, o
}

func TestWalk(t *testing.T) {
	l, o := tree(t)
	rep, err := Walk(context.Background(), l, o)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Usage{}
	for _, u := range rep.Kinds {
		got[u.Kind] = u
	}
	for _, tc := range []struct {
		kind      string
		files     int
		apparent  int64
		allocated int64 // at least
	}{
		{KindBaseImage, 1, 64 << 20, 1 << 20},
		{KindStore, 1, 1 << 20, 1 << 20},
		{KindStorePart, 2, 2 << 20, 2 << 20},
		{KindInstanceDisk, 2, 2 << 30, 384 << 10},
		{KindVolume, 3, 100<<20 + 2<<30, 320 << 10},
		{KindEphemeral, 3, 3 * 512 << 20, 192 << 10},
		{KindRunDir, 1, 4096, 4096},
		{KindLogs, 1, 100, 100},
	} {
		u := got[tc.kind]
		if u.Files != tc.files || u.Apparent != tc.apparent || u.Allocated < tc.allocated {
			t.Errorf("%s: got %+v, want %d files, %d apparent, >= %d allocated", tc.kind, u, tc.files, tc.apparent, tc.allocated)
		}
		// Sparse: far less allocated than apparent for disks.
		if u.Allocated > u.Apparent+64<<10 {
			t.Errorf("%s: allocated %d > apparent %d", tc.kind, u.Allocated, u.Apparent)
		}
	}
	if a := got[KindInstanceDisk]; a.Allocated > 16<<20 {
		t.Errorf("instance disks allocated %d: sparse files counted at their size", a.Allocated)
	}
	var paths []string
	for _, it := range rep.Reclaimable {
		paths = append(paths, strings.TrimPrefix(it.Path, filepath.Dir(filepath.Dir(l.VolumesDir))+"/"))
	}
	want := []string{"cache/tmp/old.part", "exec/vms/tap9", "exec/volumes/" + refB}
	if strings.Join(paths, " ") != strings.Join(want, " ") {
		t.Errorf("reclaimable %v, want %v", paths, want)
	}
}

func TestWalkMissingDirs(t *testing.T) {
	root := t.TempDir()
	l := Layout{CacheRoot: filepath.Join(root, "nope"), VolumesDir: filepath.Join(root, "nope2"), RunDir: filepath.Join(root, "x")}
	rep, err := Walk(context.Background(), l, Owners{})
	if err != nil || rep.Allocated != 0 || len(rep.Reclaimable) != 0 {
		t.Fatalf("got %+v, %v", rep, err)
	}
}

func TestReclaim(t *testing.T) {
	ctx := context.Background()
	l, o := tree(t)
	dry, err := Reclaim(ctx, l, o, true)
	if err != nil {
		t.Fatal(err)
	}
	if !dry.DryRun || len(dry.Items) != 3 || dry.Removed != 0 || dry.Freed <= 0 {
		t.Fatalf("dry run: %+v", dry)
	}
	for _, it := range dry.Items {
		if _, err := os.Stat(it.Path); err != nil {
			t.Errorf("dry run removed %s", it.Path)
		}
	}
	res, err := Reclaim(ctx, l, o, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 3 || res.Freed != dry.Freed {
		t.Fatalf("reclaim: %+v, dry run said %d bytes", res, dry.Freed)
	}
	for _, it := range dry.Items {
		if _, err := os.Stat(it.Path); !os.IsNotExist(err) {
			t.Errorf("%s still there", it.Path)
		}
	}
	// Owned, young, and program volumes are kept.
	for _, p := range []string{
		filepath.Join(l.VolumesDir, refA, "inst-aaaaaaaaaaaaaaaa.qcow2"),
		filepath.Join(l.VolumesDir, refC, "data.ext4"),
		filepath.Join(l.RunDir, "i-aaaaaaaaaaaaaaaa", "console.log"),
		filepath.Join(l.RunDir, "tap7", "ephemeral-0.ext4"),
		filepath.Join(l.RunDir, "tap8", "ephemeral-0.ext4"),
		filepath.Join(l.CacheRoot, "tmp", "new.part"),
		filepath.Join(l.CacheRoot, "files", "f1"),
	} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("kept file removed: %v", err)
		}
	}
	again, err := Reclaim(ctx, l, o, false)
	if err != nil || again.Removed != 0 || again.Freed != 0 || len(again.Items) != 0 {
		t.Fatalf("second reclaim: %+v, %v", again, err)
	}
}

// A symbolic link in a run directory is not followed out of the tree.
func TestWalkDoesNotFollowLinks(t *testing.T) {
	l, o := tree(t)
	outside := t.TempDir()
	sparse(t, filepath.Join(outside, "precious"), 1<<20, 1<<20)
	dir := filepath.Join(l.RunDir, "tap5")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	o.MinAge = time.Nanosecond
	res, err := Reclaim(context.Background(), l, o, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("orphan run directory kept (%+v)", res)
	}
	if _, err := Reclaim(context.Background(), l, o, false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(outside, "precious")); err != nil {
		t.Fatalf("file behind a link removed: %v", err)
	}
}

func TestSpaceCheck(t *testing.T) {
	free := func(n int64) func(string) (int64, error) { return func(string) (int64, error) { return n, nil } }
	for _, tc := range []struct {
		name           string
		free, reserve  int64
		need, promised int64
		refused        bool
	}{
		{"fits", 10 << 30, 1 << 30, 2 << 30, 0, false},
		{"reserve", 10 << 30, 9 << 30, 2 << 30, 0, true},
		{"promised", 10 << 30, 1 << 30, 2 << 30, 8 << 30, true},
		{"exact", 10 << 30, 1 << 30, 5 << 30, 4 << 30, false},
		{"nothing", 0, 1 << 30, 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Space{Free: free(tc.free), Reserve: tc.reserve}.Check("/x", "instance "+refA, tc.need, tc.promised)
			if (err != nil) != tc.refused || (err != nil && !errors.Is(err, ErrNoSpace)) {
				t.Fatalf("got %v, refused want %v", err, tc.refused)
			}
		})
	}
	err := Space{Free: func(string) (int64, error) { return 0, errors.New("boom") }}.Check("/x", "y", 1, 0)
	if err == nil || errors.Is(err, ErrNoSpace) {
		t.Fatalf("statfs failure: %v", err)
	}
}
