package assets

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testenv"
)

// TestReproducibleBuild builds every asset twice from the same inputs, in
// two cache directories, and checks that each is the same bytes both
// times; then that the runtime holds nothing of the build's day (which
// two builds on one day would not show): no file time after
// SourceDateEpoch, the password dates of /etc/shadow at its day, .pyc
// files checked by hash rather than by their source's time. The .deb
// files are downloaded once, into the test cache's package cache; each
// build takes a minute or two.
func TestReproducibleBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds Debian roots: not in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (mmdebstrap)")
	}
	testenv.RequireTools(t, "apt-get", "apt-cache", "dpkg-deb", "mmdebstrap", "mksquashfs", "unsquashfs", "go")
	packages := testenv.PackageCache()
	initBin := buildInit(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	// One build in a private directory (t.TempDir is 0700: apt, not
	// reaching it as its sandbox user, downloads as root), the other in one
	// that every user reaches.
	shared := testenv.ReachableTempDir(t, "reproducible-")
	var builds [2]Manifest
	for i, dir := range []string{t.TempDir(), shared} {
		m, err := Build(ctx, Options{Dir: dir, Init: initBin, Runtime: true, PackageCache: packages, Progress: testWriter{t}})
		if err != nil {
			t.Fatal(err)
		}
		builds[i] = m
	}
	for _, name := range []Name{KernelBzImage, KernelVmlinux, Initramfs, Runtime} {
		a, b := builds[0].Assets[name], builds[1].Assets[name]
		if a == nil || b == nil {
			t.Fatalf("%s: not built", name)
		}
		if a.SHA256 != b.SHA256 || a.Size != b.Size {
			t.Errorf("%s differs between two builds: %s (%d bytes), then %s (%d bytes)", name, a.SHA256, a.Size, b.SHA256, b.Size)
			if name == Runtime {
				reportRuntimeDiff(t, mustPath(t, builds[0], Runtime), mustPath(t, builds[1], Runtime))
			}
		} else {
			t.Logf("%s: sha256 %s both times", name, a.SHA256)
		}
	}

	img := mustPath(t, builds[0], Runtime)
	if info := runOut(t, "unsquashfs", "-mkfs-time", img); strings.TrimSpace(info) != strconv.FormatInt(SourceDateEpoch, 10) {
		t.Errorf("runtime's creation time %s, want %d", strings.TrimSpace(info), SourceDateEpoch)
	}
	root := filepath.Join(t.TempDir(), "root")
	runOut(t, "unsquashfs", "-quiet", "-no-progress", "-d", root, img)
	checkNoBuildDay(t, root)
}

// checkNoBuildDay checks that an unpacked root holds nothing of the day it
// was built on.
func checkNoBuildDay(t *testing.T, root string) {
	t.Helper()
	epoch := time.Unix(SourceDateEpoch, 0)
	var later []string
	pycs := 0
	err := walkRoot(root, func(p, rel string, d fs.DirEntry, info fs.FileInfo) error {
		if info.ModTime().After(epoch) && rel != "." {
			later = append(later, rel+" "+info.ModTime().UTC().Format(time.RFC3339))
		}
		if strings.HasSuffix(p, ".pyc") && d.Type().IsRegular() {
			pycs++
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			// PEP 552: flags 0b11 is a hash-based .pyc checked against its
			// source; 0 is one checked against the source's time.
			if len(b) < 8 || b[4] != 3 {
				t.Errorf("%s is not a checked hash-based .pyc", rel)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(later) > 0 {
		t.Errorf("%d files have times after SOURCE_DATE_EPOCH, e.g. %s", len(later), strings.Join(later[:min(5, len(later))], ", "))
	}
	if pycs == 0 {
		t.Error("no .pyc files: were they left out?")
	}
	shadow, err := os.ReadFile(filepath.Join(root, "etc", "shadow"))
	if err != nil {
		t.Fatal(err)
	}
	day := strconv.FormatInt(SourceDateEpoch/86400, 10)
	for _, line := range bytes.Split(bytes.TrimSpace(shadow), []byte("\n")) {
		if f := strings.Split(string(line), ":"); len(f) < 3 || f[2] != day {
			t.Errorf("/etc/shadow: %s: last change not on day %s (SOURCE_DATE_EPOCH)", f[0], day)
		}
	}
}

// reportRuntimeDiff unpacks two runtimes and names the files that differ
// in content, mode, owner or time, so that a failure says what to fix.
func reportRuntimeDiff(t *testing.T, a, b string) {
	t.Helper()
	var sums [2]map[string]string
	for i, img := range []string{a, b} {
		root := filepath.Join(t.TempDir(), "root")
		runOut(t, "unsquashfs", "-quiet", "-no-progress", "-d", root, img)
		sums[i] = map[string]string{}
		err := walkRoot(root, func(p, rel string, d fs.DirEntry, info fs.FileInfo) error {
			st := info.Sys().(*syscall.Stat_t)
			desc := fmt.Sprintf("%v %d:%d %d", info.Mode(), st.Uid, st.Gid, info.ModTime().Unix())
			switch {
			case d.Type().IsRegular():
				data, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				desc += fmt.Sprintf(" %x", sha256.Sum256(data))
			case d.Type()&fs.ModeSymlink != 0:
				target, _ := os.Readlink(p)
				desc += " -> " + target
			}
			sums[i][rel] = desc
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var diffs []string
	for p, d := range sums[0] {
		if sums[1][p] != d {
			diffs = append(diffs, fmt.Sprintf("%s: %q, then %q", p, d, sums[1][p]))
		}
	}
	for p, d := range sums[1] {
		if _, ok := sums[0][p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: missing, then %q", p, d))
		}
	}
	sort.Strings(diffs)
	if len(diffs) == 0 {
		t.Log("the two runtimes hold the same files, modes, owners and times: the difference is in the image's layout")
	}
	for _, d := range diffs[:min(len(diffs), 20)] {
		t.Log("differs:", d)
	}
}

// walkRoot calls fn for every file of an unpacked root, with its path
// relative to the root and its information.
func walkRoot(root string, fn func(path, rel string, d fs.DirEntry, info fs.FileInfo) error) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		return fn(p, rel, d, info)
	})
}
