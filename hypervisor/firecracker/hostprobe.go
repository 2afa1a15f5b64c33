package firecracker

import (
	"path/filepath"
	"slices"
)

// CgroupLimitFiles returns the cgroup version jails use and, by cgroup
// hierarchy, the files the jailer writes in a jail's cgroup to limit it
// (JailerArgs): cpu.max and memory.max in the v2 hierarchy, or the cpu
// and memory files in the v1 hierarchies of those controllers. A host
// whose hierarchies lack one of them cannot limit jailed VMs.
func CgroupLimitFiles() (version int, files map[string][]string, err error) {
	version = CgroupVersion()
	if version == 2 {
		return version, map[string][]string{"/sys/fs/cgroup": {"cpu.max", "memory.max"}}, nil
	}
	mounts, err := cgroupMounts()
	files = map[string][]string{}
	for _, m := range mounts {
		if m.v2 {
			continue
		}
		if slices.Contains(m.controllers, "cpu") {
			files[m.dir] = append(files[m.dir], "cpu.cfs_period_us", "cpu.cfs_quota_us")
		}
		if slices.Contains(m.controllers, "memory") {
			files[m.dir] = append(files[m.dir], "memory.limit_in_bytes")
		}
	}
	return version, files, err
}

// SocketPaths returns where the host ends of the API socket and of the
// vsock of the VM named name, whose runtime directory is dir, are made:
// in its jail under jailerBase when jailed (the jailer names the jail's
// directory after the binary firecracker), else in dir. Each must fit in
// a unix socket address (107 bytes).
func SocketPaths(jailed bool, jailerBase, firecracker, dir, name string) (api, vsock string) {
	if jailed {
		j := &Jail{Dir: filepath.Join(jailerBase, filepath.Base(firecracker), name)}
		return j.HostPath(jailAPI), j.HostPath(jailVsock)
	}
	return filepath.Join(dir, APISocket), filepath.Join(dir, VsockSocket)
}

// MaxSocketPath is the longest unix socket path Linux accepts.
const MaxSocketPath = maxSocketPath
