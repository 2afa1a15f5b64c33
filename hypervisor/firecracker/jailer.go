package firecracker

import (
	"os"
	"strconv"
	"strings"

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

// cgroupMount is a mounted cgroup hierarchy.
type cgroupMount struct {
	dir         string
	v2          bool
	controllers []string // of a v1 hierarchy
}

// mountFlags are the options of a v1 cgroup mount that name no controller.
var mountFlags = map[string]bool{"rw": true, "ro": true, "nosuid": true, "nodev": true, "noexec": true,
	"relatime": true, "noatime": true, "strictatime": true, "xattr": true, "clone_children": true, "noprefix": true}

func cgroupMounts() ([]cgroupMount, error) {
	var out []cgroupMount
	err := readMounts("/proc/self/mounts", func(fields []string) {
		if len(fields) < 4 {
			return
		}
		switch fields[2] {
		case "cgroup2":
			out = append(out, cgroupMount{dir: unescapeMount(fields[1]), v2: true})
		case "cgroup":
			m := cgroupMount{dir: unescapeMount(fields[1])}
			for _, opt := range strings.Split(fields[3], ",") {
				if !mountFlags[opt] && !strings.Contains(opt, "=") {
					m.controllers = append(m.controllers, opt)
				}
			}
			out = append(out, m)
		}
	})
	return out, err
}

// CgroupControllers returns the cgroup version jails use (CgroupVersion)
// and the controllers it offers: the v2 root's, or those mounted as v1
// hierarchies.
func CgroupControllers() (version int, controllers []string, err error) {
	version = CgroupVersion()
	if version == 2 {
		data, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers")
		return version, strings.Fields(string(data)), err
	}
	mounts, err := cgroupMounts()
	for _, m := range mounts {
		controllers = append(controllers, m.controllers...)
	}
	return version, controllers, err
}
