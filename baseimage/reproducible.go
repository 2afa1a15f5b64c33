package baseimage

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/assets"
)

// Two builds from the same packages make the same bytes, so that a ref of
// the image made on one node names the same image on another:
//
//   - mmdebstrap and the package scripts run with SOURCE_DATE_EPOCH at
//     assets.SourceDateEpoch (password dates, hash-checked .pyc files, the
//     initramfs made by initramfs-tools: gzip -n, cpio --reproducible);
//   - mmdebstrap removes its logs and caches, the customize hooks the
//     machine id and SSH host keys;
//   - file times after the epoch are clamped to it in the tree, and
//     mkfs.ext4 writes its own times at it (E2FSPROGS_FAKE_TIME), with a
//     UUID and a directory hash seed derived from the recipe; the inode
//     change and access times, which it copies from the tree and which
//     no one can set there, are set to the epoch afterwards with debugfs;
//   - the GPT disk and EFI partition GUIDs are constants, the FAT volume id
//     zero and its entries' times the epoch.

func sourceDateEpochEnv() string {
	return "SOURCE_DATE_EPOCH=" + strconv.FormatInt(assets.SourceDateEpoch, 10)
}

func fakeTimeEnv() string {
	return "E2FSPROGS_FAKE_TIME=" + strconv.FormatInt(assets.SourceDateEpoch, 10)
}

// fsUUID derives a UUID for the root filesystem's field from the recipe.
func fsUUID(field string) string {
	sum := sha256.Sum256([]byte("alephvm base image " + recipe() + " " + field))
	return uuid.NewHash(sha256.New(), uuid.NameSpaceOID, sum[:], 5).String()
}

// clampTimes sets the access and modification times of every file of
// tree that are after the epoch to it (symbolic links themselves, not
// what they point to).
func clampTimes(tree string) error {
	epoch := unix.NsecToTimespec(assets.SourceDateEpoch * 1e9)
	return filepath.WalkDir(tree, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		atime, mtime := st.Atim, st.Mtim
		if mtime.Nano() > epoch.Nano() {
			mtime = epoch
		}
		if atime.Nano() > epoch.Nano() {
			atime = epoch
		}
		if atime == st.Atim && mtime == st.Mtim {
			return nil
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{atime, mtime}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("clamp the times of %s: %w", p, err)
		}
		return nil
	})
}

// settleInodeTimes sets the change and access times of every inode of the
// ext4 image that mkfs.ext4 copied from the tree to the epoch.
func settleInodeTimes(ctx context.Context, image string) error {
	used, err := usedInodes(ctx, image)
	if err != nil {
		return err
	}
	script, err := os.CreateTemp("", "alephvm-debugfs-*")
	if err != nil {
		return err
	}
	defer os.Remove(script.Name())
	w := bufio.NewWriter(script)
	at := "@" + strconv.FormatInt(assets.SourceDateEpoch, 10)
	for _, ino := range used {
		fmt.Fprintf(w, "sif <%d> ctime %s\nsif <%d> atime %s\n", ino, at, ino, at)
	}
	if err := w.Flush(); err != nil {
		script.Close()
		return err
	}
	if err := script.Close(); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "debugfs", "-w", "-f", script.Name(), image)
	cmd.Env = append(os.Environ(), fakeTimeEnv())
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("debugfs: set the inode times of %s: %w: %s", image, err, strings.TrimSpace(stderr.String()))
	}
	// debugfs says on its standard error that a command failed, and goes
	// on; its banner is there too.
	for _, line := range strings.Split(stderr.String(), "\n") {
		if line != "" && !strings.HasPrefix(line, "debugfs ") {
			return fmt.Errorf("debugfs: set the inode times of %s: %s", image, line)
		}
	}
	return nil
}

var (
	inodesPerGroupRe = regexp.MustCompile(`(?m)^Inodes per group:\s+(\d+)$`)
	groupRe          = regexp.MustCompile(`^Group (\d+):`)
	freeInodesRe     = regexp.MustCompile(`^\s+Free inodes: ?(.*)$`)
)

// firstOrdinaryInode is the first inode that is not reserved (11 is
// lost+found, which mkfs.ext4 makes itself).
const firstOrdinaryInode = 12

// usedInodes lists the inodes of an ext4 image in use, reserved ones
// aside, from dumpe2fs's free inode ranges of each group.
func usedInodes(ctx context.Context, image string) ([]int, error) {
	out, err := exec.CommandContext(ctx, "dumpe2fs", image).Output()
	if err != nil {
		return nil, fmt.Errorf("dumpe2fs %s: %w", image, err)
	}
	return parseUsedInodes(string(out))
}

func parseUsedInodes(dump string) ([]int, error) {
	m := inodesPerGroupRe.FindStringSubmatch(dump)
	if m == nil {
		return nil, fmt.Errorf("dumpe2fs: no inodes per group")
	}
	perGroup, _ := strconv.Atoi(m[1])
	var used []int
	group := -1
	for _, line := range strings.Split(dump, "\n") {
		if g := groupRe.FindStringSubmatch(line); g != nil {
			group, _ = strconv.Atoi(g[1])
			continue
		}
		f := freeInodesRe.FindStringSubmatch(line)
		if f == nil {
			continue
		}
		if group < 0 {
			return nil, fmt.Errorf("dumpe2fs: free inodes before any group")
		}
		first, last := group*perGroup+1, (group+1)*perGroup
		free := make([]bool, perGroup)
		for _, r := range strings.Split(f[1], ",") {
			r = strings.TrimSpace(r)
			if r == "" {
				continue
			}
			lo, hi, found := strings.Cut(r, "-")
			if !found {
				hi = lo
			}
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if err1 != nil || err2 != nil || a < first || b > last || a > b {
				return nil, fmt.Errorf("dumpe2fs: group %d: free inodes %q", group, r)
			}
			for i := a; i <= b; i++ {
				free[i-first] = true
			}
		}
		for i := first; i <= last; i++ {
			if !free[i-first] && i >= firstOrdinaryInode {
				used = append(used, i)
			}
		}
		group = -1
	}
	return used, nil
}

// setSourceDateEpoch sets SOURCE_DATE_EPOCH in this process's environment
// and returns what puts the previous value back.
func setSourceDateEpoch() (restore func()) {
	old, had := os.LookupEnv("SOURCE_DATE_EPOCH")
	os.Setenv("SOURCE_DATE_EPOCH", strconv.FormatInt(assets.SourceDateEpoch, 10))
	return func() {
		if had {
			os.Setenv("SOURCE_DATE_EPOCH", old)
		} else {
			os.Unsetenv("SOURCE_DATE_EPOCH")
		}
	}
}
