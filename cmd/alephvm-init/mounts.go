package main

import (
	"archive/zip"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// Where the runtime and the overlay's writable layer are mounted in the
// initramfs; they stay mounted, out of sight, after the switch.
const (
	lowerDir = "/mnt/lower"
	rwDir    = "/mnt/rw"
)

// mountAll assembles the root filesystem in newRoot from the drives and
// tmpfs mounts, switches to it and mounts the usual API filesystems.
func (in *Init) mountAll() error {
	var runtimeDev string
	for i, d := range in.cfg.Drives {
		if d.Role == guest.RoleRuntime {
			runtimeDev = "/dev/" + guest.DeviceName(i)
		}
	}
	if err := checkFormat(runtimeDev, guest.FormatSquashfs); err != nil {
		return fmt.Errorf("runtime: %w", err)
	}
	for _, dir := range []string{lowerDir, rwDir, newRoot} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	if err := mount(runtimeDev, lowerDir, "squashfs", unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("runtime: %w", err)
	}
	if err := mount("tmpfs", rwDir, "tmpfs", 0, "mode=0755"); err != nil {
		return err
	}
	for _, dir := range []string{rwDir + "/upper", rwDir + "/work"} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", lowerDir, rwDir, rwDir)
	if err := mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		return fmt.Errorf("root overlay: %w", err)
	}
	in.trace("root overlay mounted")

	u, err := setupWorkloadUser(newRoot, in.cfg.Workload.User)
	if err != nil {
		return fmt.Errorf("workload user: %w", err)
	}
	in.user = u

	for _, m := range mountOrder(in.cfg) {
		if err := in.mountOne(m); err != nil {
			return err
		}
		in.trace("%s ready", m.path)
	}
	if err := switchRoot(newRoot); err != nil {
		return err
	}
	in.trace("root switched")
	return mountAPI()
}

// mountPoint is a drive or a tmpfs to put in place.
type mountPoint struct {
	drive  int // index in Config.Drives, or -1 for a tmpfs
	path   string
	tmpfsM int
}

// mountOrder lists every mount but the runtime, parents before children.
func mountOrder(cfg guest.Config) []mountPoint {
	var ms []mountPoint
	for i, d := range cfg.Drives {
		if d.Role != guest.RoleRuntime {
			ms = append(ms, mountPoint{drive: i, path: d.Mount})
		}
	}
	for _, t := range cfg.Tmpfs {
		ms = append(ms, mountPoint{drive: -1, path: t.Mount, tmpfsM: t.SizeMiB})
	}
	slices.SortStableFunc(ms, func(a, b mountPoint) int {
		return strings.Count(a.path, "/") - strings.Count(b.path, "/")
	})
	return ms
}

func (in *Init) mountOne(m mountPoint) error {
	target := filepath.Join(newRoot, m.path)
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	if m.drive < 0 {
		if err := mount("tmpfs", target, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%dm,mode=0755", m.tmpfsM)); err != nil {
			return err
		}
		in.addMounted(m.path)
		return os.Chown(target, in.user.uid, in.user.gid)
	}
	d := in.cfg.Drives[m.drive]
	dev := "/dev/" + guest.DeviceName(m.drive)
	what := fmt.Sprintf("%s %s (%s)", d.Role, d.Mount, dev)
	if err := checkFormat(dev, d.Format); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	switch d.Format {
	case guest.FormatSquashfs:
		if err := mount(dev, target, "squashfs", unix.MS_RDONLY|unix.MS_NODEV, ""); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		in.addMounted(m.path)
	case guest.FormatExt4:
		flags := uintptr(unix.MS_NODEV | unix.MS_RELATIME)
		if d.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		if err := mount(dev, target, "ext4", flags, ""); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		in.addMounted(m.path)
		if !d.ReadOnly {
			if err := os.Chown(target, in.user.uid, in.user.gid); err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
		}
	case guest.FormatZip:
		if err := unzipDevice(dev, d.Size, target, in.user); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
	case guest.FormatFile:
		name := in.cfg.Workload.Entrypoint
		if in.cfg.Workload.Interface == guest.InterfaceASGI {
			name = guest.PlainCodeModule + ".py"
		}
		if err := copyDevice(dev, d.Size, filepath.Join(target, name), in.user); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
	}
	return nil
}

func (in *Init) addMounted(path string) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.mounted = append(in.mounted, path)
}

// checkFormat makes sure the device holds what the config says, so that
// drives attached out of order fail with a clear message.
func checkFormat(dev string, format guest.Format) error {
	f, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	head := make([]byte, 2048)
	n, _ := io.ReadFull(f, head)
	head = head[:n]
	var ok bool
	switch format {
	case guest.FormatSquashfs:
		ok = bytes.HasPrefix(head, []byte("hsqs"))
	case guest.FormatExt4:
		ok = len(head) >= 1082 && head[1080] == 0x53 && head[1081] == 0xef
	case guest.FormatZip:
		ok = bytes.HasPrefix(head, []byte("PK\x03\x04")) || bytes.HasPrefix(head, []byte("PK\x05\x06"))
	case guest.FormatFile:
		ok = true
	}
	if !ok {
		return fmt.Errorf("%s does not hold %s (drives attached out of order?)", dev, format)
	}
	return nil
}

func mount(source, target, fstype string, flags uintptr, data string) error {
	if err := unix.Mount(source, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s (%s): %w", source, target, fstype, err)
	}
	return nil
}

// unzipDevice unpacks the zip archive of size bytes on dev into dir; the
// files belong to u. Entries cannot escape dir, by path or by symlink.
func unzipDevice(dev string, size int64, dir string, u user) error {
	f, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := zip.NewReader(f, size)
	if err != nil {
		return fmt.Errorf("read zip: %w", err)
	}
	return unzip(zr, dir, u)
}

func unzip(zr *zip.Reader, dir string, u user) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	for _, zf := range zr.File {
		name := strings.TrimSuffix(path.Clean(strings.TrimPrefix(zf.Name, "/")), "/")
		if name == "." || name == "" {
			continue
		}
		if err := root.MkdirAll(path.Dir(name), 0o755); err != nil {
			return fmt.Errorf("unzip %s: %w", zf.Name, err)
		}
		mode := zf.Mode()
		switch {
		case mode.IsDir():
			err = root.MkdirAll(name, 0o755)
		case mode&fs.ModeSymlink != 0:
			err = unzipSymlink(root, zf, name)
		default:
			err = unzipFile(root, zf, name, mode.Perm()|0o600)
		}
		if err != nil {
			return fmt.Errorf("unzip %s: %w", zf.Name, err)
		}
		root.Lchown(name, u.uid, u.gid)
	}
	return chownTree(root, ".", u)
}

func unzipSymlink(root *os.Root, zf *zip.File, name string) error {
	rc, err := zf.Open()
	if err != nil {
		return err
	}
	defer rc.Close()
	target, err := io.ReadAll(io.LimitReader(rc, 4096))
	if err != nil {
		return err
	}
	return root.Symlink(string(target), name)
}

func unzipFile(root *os.Root, zf *zip.File, name string, perm fs.FileMode) error {
	rc, err := zf.Open()
	if err != nil {
		return err
	}
	defer rc.Close()
	out, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, rc); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// chownTree gives the directories below dir in root to u.
func chownTree(root *os.Root, dir string, u user) error {
	return fs.WalkDir(root.FS(), dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return root.Lchown(p, u.uid, u.gid)
		}
		return nil
	})
}

// copyDevice writes the first size bytes of dev to file, executable and
// owned by u.
func copyDevice(dev string, size int64, file string, u user) error {
	f, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	out, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, io.LimitReader(f, size)); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chown(file, u.uid, u.gid)
}

// switchRoot makes dir the root: it moves /dev, /proc and /sys into it,
// frees the initramfs's files, moves dir onto / and enters it.
func switchRoot(dir string) error {
	for _, m := range []string{"/dev", "/proc", "/sys"} {
		target := dir + m
		if err := os.MkdirAll(target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s into the new root: %w", m, err)
		}
	}
	// What the initramfs holds is now only taking memory.
	os.RemoveAll("/lib")
	os.Remove("/init")
	if err := os.Chdir(dir); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the new root onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return os.Chdir("/")
}

// mountAPI mounts the filesystems programs expect, in the new root.
func mountAPI() error {
	for _, m := range []struct {
		source, target, fstype string
		flags                  uintptr
		data                   string
		mode                   os.FileMode
	}{
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5", 0o755},
		{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o755},
	} {
		if err := os.MkdirAll(m.target, m.mode); err != nil {
			return err
		}
		if err := mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
			return err
		}
	}
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx",
	} {
		if err := os.Symlink(target, link); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	return nil
}
