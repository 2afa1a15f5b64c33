package firecracker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// JailUIDs is how many uids (and gids) jails are given, from the first
// one configured: one per running VM.
const JailUIDs = 65536

// vmmOverheadMiB is the memory Firecracker needs beside the guest's: its
// own few MiB and the host page cache its disk I/O fills, which the
// cgroup counts and reclaims rather than kills for.
const vmmOverheadMiB = 64

// cgroupPeriod is the CPU quota period, in microseconds.
const cgroupPeriod = 100000

// JailerArgs returns the jailer's command line (without the binary) that
// runs firecracker in jail j: as the jail's uid and gid, in a PID
// namespace of its own, in a cgroup limited to vcpus CPUs and the guest's
// memory plus Firecracker's overhead. The VM's tap stays in the host's
// network namespace (docs/adr/0001-firecracker-network-namespace.md), so
// there is no --netns.
func JailerArgs(j *Jail, firecracker, base string, cgroupVersion, vcpus, memoryMiB int) []string {
	memory := strconv.Itoa((memoryMiB + vmmOverheadMiB) << 20)
	quota := strconv.Itoa(vcpus * cgroupPeriod)
	a := []string{
		"--id", j.ID,
		"--exec-file", firecracker,
		"--uid", strconv.Itoa(j.UID),
		"--gid", strconv.Itoa(j.GID),
		"--chroot-base-dir", base,
		"--new-pid-ns",
		"--cgroup-version", strconv.Itoa(cgroupVersion),
	}
	if cgroupVersion == 2 {
		a = append(a,
			"--cgroup", "cpu.max="+quota+" "+strconv.Itoa(cgroupPeriod),
			"--cgroup", "memory.max="+memory,
		)
	} else {
		a = append(a,
			"--cgroup", "cpu.cfs_period_us="+strconv.Itoa(cgroupPeriod),
			"--cgroup", "cpu.cfs_quota_us="+quota,
			"--cgroup", "memory.limit_in_bytes="+memory,
		)
	}
	return append(a, "--",
		"--config-file", jailConfig,
		"--api-sock", jailAPI,
	)
}

// CgroupVersion is 2 when /sys/fs/cgroup is the unified hierarchy, else 1
// (a v1 or hybrid host, where the jailer uses the v1 controllers).
func CgroupVersion() int {
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		return 2
	}
	return 1
}

// freeUID returns the first of JailUIDs uids from first that no jail under
// dir (<base>/<exec name>) owns: a jail's root is owned by its uid from
// the moment it is made until it is removed, so the jails on disk are the
// whole record, across node restarts too.
func freeUID(dir string, first int) (int, error) {
	used := map[int]bool{}
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("list jails: %w", err)
	}
	for _, e := range entries {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(dir, e.Name(), "root"), &st) == nil {
			used[int(st.Uid)] = true
		}
	}
	for uid := first; uid < first+JailUIDs; uid++ {
		if !used[uid] {
			return uid, nil
		}
	}
	return 0, fmt.Errorf("all %d jail uids from %d are in use", JailUIDs, first)
}
