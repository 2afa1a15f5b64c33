package firecracker

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/hypervisor"
)

// A jail is the chroot the jailer runs one VM's Firecracker in, as its own
// uid and gid. The node lays it out before the jailer runs: the VM's files
// appear in it by hard link (or a bind mount across filesystems), never by
// copy, and a block device by a device node of its own.

// Where the VM's files appear inside the jail. The jailer itself makes
// /dev/kvm, /dev/net/tun, /dev/urandom and /run.
const (
	jailConfig  = "/config.json"
	jailAPI     = "/run/firecracker.socket"
	jailVsock   = "/run/v.sock"
	jailLog     = "/firecracker.log"
	jailMetrics = "/metrics.json"
	jailKernel  = "/kernel"
	jailInitrd  = "/initrd"
)

// Files the node keeps in the VM's runtime directory, so that they outlive
// the jail.
const (
	ConfigFile    = "firecracker.json"
	LogFile       = "firecracker.log"
	MetricsFile   = "metrics.json"
	ConsoleLog    = hypervisor.ConsoleLog // Firecracker's stdout: the guest's serial console
	ArgsFile      = "firecracker.args"    // the command line, for whoever debugs
	StateFile     = "vm.json"
	APISocket     = "firecracker.sock" // without the jailer
	VsockSocket   = "v.sock"           // without the jailer
	jailerPidFile = "firecracker.pid"  // the jailer's, in the jail root
)

// Jail is one VM's jail as laid out by PlanJail.
type Jail struct {
	ID string `json:"id"`
	// Dir is <chroot base>/<firecracker binary's name>/<id>, the jailer's
	// directory for this VM; the chroot is its root/ and the whole of Dir
	// is removed with the jail.
	Dir      string      `json:"dir"`
	UID      int         `json:"uid"`
	GID      int         `json:"gid"`
	Dirs     []JailDir   `json:"dirs"`
	Entries  []JailEntry `json:"entries"`
	ExecName string      `json:"exec_name"` // the jailer's name for its cgroups
}

// JailDir is a directory made in the jail, owned by the jail.
type JailDir struct {
	Path string      `json:"path"`
	Mode fs.FileMode `json:"mode"`
}

// JailEntry is a host file (or block device) that appears in the jail.
//
//   - A regular file is hard-linked when the jail is on its filesystem and
//     bind-mounted otherwise (read-only unless Writable): the same inode
//     either way, so nothing is copied and nothing is written back.
//   - A read-only file keeps its owner and mode (store files are 0444); it
//     must be readable by others, since the jail's uid owns nothing of it.
//   - A writable file is handed to the jail's uid and gid while the VM runs
//     (two VMs never share one) and given back to root with the jail.
//   - A block device (a device-mapper snapshot) is a device node of its
//     own in the jail, made with mknod, owned by the jail, mode DeviceMode.
type JailEntry struct {
	Host     string `json:"host"`
	Path     string `json:"path"`
	Writable bool   `json:"writable"`
}

// DeviceMode is the mode of a block device's node in the jail.
func (e JailEntry) DeviceMode() fs.FileMode {
	if e.Writable {
		return 0o600
	}
	return 0o400
}

// Root is the jail's root directory on the host.
func (j *Jail) Root() string { return filepath.Join(j.Dir, "root") }

// HostPath is where path inside the jail is on the host.
func (j *Jail) HostPath(path string) string { return filepath.Join(j.Root(), path) }

var jailID = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)

// PlanJail lays out the jail of the VM spec: which host file appears where
// and owned by whom. base is the jailer's chroot base directory, execName
// the base name of the Firecracker binary (the jailer names the jail's
// directory after it). It also returns the paths the config must use.
func PlanJail(spec hypervisor.Spec, base, execName string, uid, gid int) (*Jail, Paths, error) {
	if !jailID.MatchString(spec.Name) {
		return nil, Paths{}, fmt.Errorf("vm %s: the jailer takes ids of 1 to 64 letters, digits and dashes", spec.Name)
	}
	j := &Jail{
		ID: spec.Name, Dir: filepath.Join(base, execName, spec.Name), UID: uid, GID: gid, ExecName: execName,
		// The jailer makes / and /run the same way; /run must exist
		// before, for the sockets made there.
		Dirs: []JailDir{{"/", 0o700}, {"/run", 0o700}},
	}
	inJail := map[string]string{}
	add := func(host, path string, writable bool) {
		if _, ok := inJail[host]; ok {
			return
		}
		inJail[host] = path
		j.Entries = append(j.Entries, JailEntry{Host: host, Path: path, Writable: writable})
	}
	add(filepath.Join(spec.Dir, ConfigFile), jailConfig, false)
	add(filepath.Join(spec.Dir, LogFile), jailLog, true)
	add(filepath.Join(spec.Dir, MetricsFile), jailMetrics, true)
	add(spec.Boot.Kernel, jailKernel, false)
	if spec.Boot.Initrd != "" {
		add(spec.Boot.Initrd, jailInitrd, false)
	}
	for i, d := range spec.Drives {
		add(d.Path, fmt.Sprintf("/drive%d", i), !d.ReadOnly)
	}
	for _, path := range []string{jailAPI, jailVsock} {
		if p := j.HostPath(path); len(p) > maxSocketPath {
			return nil, Paths{}, fmt.Errorf("vm %s: socket path %s would be longer than %d bytes: use a shorter jailer base directory", spec.Name, p, maxSocketPath)
		}
	}
	paths := Paths{
		Path:        func(host string) string { return inJail[host] },
		VsockSocket: jailVsock,
		LogFile:     jailLog,
		MetricsFile: jailMetrics,
	}
	return j, paths, nil
}

// maxSocketPath is the longest unix socket path Linux accepts.
const maxSocketPath = 107

// Create makes the jail on the host as planned, first removing what a
// previous run may have left (the jailer refuses a jail that has its
// binary or pidfile already).
func (j *Jail) Create() (err error) {
	if err := j.Remove(); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = j.Remove()
		}
	}()
	if err := os.MkdirAll(filepath.Dir(j.Dir), 0o755); err != nil {
		return fmt.Errorf("create jail %s: %w", j.ID, err)
	}
	for _, d := range j.Dirs {
		p := j.HostPath(d.Path)
		if err := os.MkdirAll(p, d.Mode); err != nil {
			return fmt.Errorf("create jail %s: %w", j.ID, err)
		}
		if err := os.Chmod(p, d.Mode); err != nil {
			return fmt.Errorf("create jail %s: %w", j.ID, err)
		}
		if err := os.Chown(p, j.UID, j.GID); err != nil {
			return fmt.Errorf("create jail %s: %w", j.ID, err)
		}
	}
	for _, e := range j.Entries {
		if err := j.place(e); err != nil {
			return fmt.Errorf("jail %s: put %s at %s: %w", j.ID, e.Host, e.Path, err)
		}
	}
	return nil
}

func (j *Jail) place(e JailEntry) error {
	var st unix.Stat_t
	if err := unix.Stat(e.Host, &st); err != nil {
		return err
	}
	target := j.HostPath(e.Path)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		// The node is the device: the kernel finds the device by its
		// number, so this one node gives the jail this one device and
		// nothing else of /dev/mapper.
		if err := unix.Mknod(target, unix.S_IFBLK|uint32(e.DeviceMode()), int(st.Rdev)); err != nil {
			return fmt.Errorf("mknod: %w", err)
		}
		if err := unix.Chmod(target, uint32(e.DeviceMode())); err != nil { // past the umask
			return err
		}
		return os.Lchown(target, j.UID, j.GID)
	case unix.S_IFREG:
	default:
		return errors.New("neither a regular file nor a block device")
	}
	if !e.Writable && st.Mode&0o004 == 0 {
		return fmt.Errorf("mode %o: a read-only file must be readable by others, the jail's uid %d owns none of it", st.Mode&0o7777, j.UID)
	}
	err := os.Link(e.Host, target)
	if errors.Is(err, unix.EXDEV) {
		err = bindFile(e.Host, target, !e.Writable)
	}
	if err != nil {
		return err
	}
	if e.Writable {
		return os.Chown(e.Host, j.UID, j.GID)
	}
	return nil
}

// bindFile makes target show the file host by a bind mount.
func bindFile(host, target string, readOnly bool) error {
	f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o400)
	if err != nil {
		return err
	}
	f.Close()
	if err := unix.Mount(host, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount: %w", err)
	}
	if readOnly {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return fmt.Errorf("make bind mount read-only: %w", err)
		}
	}
	return nil
}

// Remove takes the jail away: its bind mounts, the jail's hold on the
// writable files (given back to root), every file in it (links and nodes
// only; the files they stand for stay), and the jailer's cgroups for it.
// A jail that is not there is not an error.
func (j *Jail) Remove() error {
	mounts, err := mountsUnder(j.Dir)
	if err != nil {
		return fmt.Errorf("remove jail %s: %w", j.ID, err)
	}
	for _, m := range mounts {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("remove jail %s: unmount %s: %w", j.ID, m, err)
		}
	}
	for _, e := range j.Entries {
		var st unix.Stat_t
		if !e.Writable || unix.Stat(e.Host, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || int(st.Uid) != j.UID {
			continue
		}
		if err := os.Chown(e.Host, 0, 0); err != nil {
			return fmt.Errorf("remove jail %s: give %s back to root: %w", j.ID, e.Host, err)
		}
	}
	if err := os.RemoveAll(j.Dir); err != nil {
		return fmt.Errorf("remove jail %s: %w", j.ID, err)
	}
	cgroups, err := jailCgroups(j.ExecName, j.ID)
	if err != nil {
		return fmt.Errorf("remove jail %s: %w", j.ID, err)
	}
	for _, cg := range cgroups {
		if err := unix.Rmdir(cg); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove jail %s: remove cgroup %s: %w", j.ID, cg, err)
		}
	}
	return nil
}

// mountsUnder lists the mount points under dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	var out []string
	err := readMounts("/proc/self/mountinfo", func(fields []string) {
		if len(fields) < 5 {
			return
		}
		if mp := unescapeMount(fields[4]); mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	})
	slices.SortFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out, err
}

// readMounts calls fn with the fields of each line of a /proc mounts file
// (mounts or mountinfo).
func readMounts(path string, fn func(fields []string)) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fn(strings.Fields(sc.Text()))
	}
	return sc.Err()
}

// unescapeMount undoes the octal escapes of /proc mount files (\040 for a
// space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// jailCgroups lists the cgroup directories the jailer makes for jail id:
// <mount>/<parent>/<id> in each v1 hierarchy whose controller it sets, or
// in the v2 hierarchy; the parent is the binary's name by default.
func jailCgroups(execName, id string) ([]string, error) {
	mounts, err := cgroupMounts()
	var out []string
	for _, m := range mounts {
		if m.v2 || slices.Contains(m.controllers, "cpu") || slices.Contains(m.controllers, "memory") {
			out = append(out, filepath.Join(m.dir, execName, id))
		}
	}
	return out, err
}
