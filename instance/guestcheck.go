package instance

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/storage"
)

// The partition types a root filesystem is looked for in: Linux in an
// MBR; Linux filesystem and x86-64 root in a GPT (as stored).
var (
	mbrLinux     = byte(0x83)
	gptLinuxFS   = guidBytes(0x0fc63daf, 0x8483, 0x4772, [8]byte{0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4})
	gptRootX8664 = guidBytes(0x4f68bce3, 0xe8cd, 0x4db1, [8]byte{0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09})
)

func guidBytes(a uint32, b, c uint16, d [8]byte) []byte {
	g := make([]byte, 16)
	binary.LittleEndian.PutUint32(g, a)
	binary.LittleEndian.PutUint16(g[4:], b)
	binary.LittleEndian.PutUint16(g[6:], c)
	copy(g[8:], d[:])
	return g
}

// extent is where a filesystem lies in a disk, in bytes.
type extent struct{ offset, size int64 }

// rootCandidate picks, from the partition table at the start of a disk,
// the largest Linux partition: where an image's root filesystem is. A
// bare filesystem is its own root; ok is false where there is no Linux
// partition.
func rootCandidate(head []byte, form baseForm, diskSize int64) (extent, bool) {
	if form == formExt4 {
		return extent{0, diskSize}, true
	}
	var best extent
	consider := func(start, size int64) {
		if start > 0 && size > best.size && start+size <= diskSize {
			best = extent{start, size}
		}
	}
	if len(head) >= 1024 && string(head[512:520]) == "EFI PART" {
		for _, e := range gptEntries(head) {
			if bytes.Equal(e[:16], gptLinuxFS) || bytes.Equal(e[:16], gptRootX8664) {
				first, last := binary.LittleEndian.Uint64(e[32:40]), binary.LittleEndian.Uint64(e[40:48])
				if last >= first && last < 1<<40 {
					consider(int64(first)*512, int64(last-first+1)*512)
				}
			}
		}
	} else if len(head) >= 512 {
		for i := range 4 {
			e := head[446+16*i : 446+16*(i+1)]
			if e[4] == mbrLinux {
				consider(int64(binary.LittleEndian.Uint32(e[8:12]))*512, int64(binary.LittleEndian.Uint32(e[12:16]))*512)
			}
		}
	}
	return best, best.size > 0
}

// ext4Reader reads files of an ext4 filesystem with debugfs, which opens
// it read-only. The filesystem is the image's owner's: debugfs runs as
// nobody, with the file passed as an open descriptor, and a deadline.
type ext4Reader struct {
	file   *os.File
	offset int64
}

const debugfsTimeout = 30 * time.Second

// run runs one debugfs request; an error when debugfs failed or found no
// ext4 filesystem, else its output and what it said of the request.
func (r ext4Reader) run(ctx context.Context, request string) (stdout, stderr []byte, err error) {
	ctx, cancel := context.WithTimeout(ctx, debugfsTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "debugfs", "-R", request, fmt.Sprintf("/dev/fd/3?offset=%d", r.offset))
	cmd.ExtraFiles = []*os.File{r.file}
	if os.Geteuid() == 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &limited{&out, 1 << 20}, &limited{&errOut, 64 << 10}
	if err := cmd.Run(); err != nil {
		return nil, nil, fmt.Errorf("debugfs %s: %v: %s", request, err, bytes.TrimSpace(errOut.Bytes()))
	}
	if bytes.Contains(errOut.Bytes(), []byte("Bad magic number")) || bytes.Contains(errOut.Bytes(), []byte("while trying to open")) {
		return nil, nil, fmt.Errorf("not an ext4 filesystem: %s", bytes.TrimSpace(errOut.Bytes()))
	}
	return out.Bytes(), errOut.Bytes(), nil
}

// limited keeps the first n bytes written to it and drops the rest.
type limited struct {
	buf *bytes.Buffer
	n   int
}

func (l *limited) Write(p []byte) (int, error) {
	if room := l.n - l.buf.Len(); room > 0 {
		l.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// errNoFile is a file the filesystem does not hold.
var errNoFile = errors.New("no such file")

// cat returns a regular file's content.
func (r ext4Reader) cat(ctx context.Context, path string) ([]byte, error) {
	out, errOut, err := r.run(ctx, "cat "+path)
	if err != nil {
		return nil, err
	}
	if bytes.Contains(errOut, []byte("not found")) {
		return nil, errNoFile
	}
	return out, nil
}

// exists says whether path is in the filesystem.
func (r ext4Reader) exists(ctx context.Context, path string) (bool, error) {
	_, errOut, err := r.run(ctx, "stat "+path)
	if err != nil {
		return false, err
	}
	return !bytes.Contains(errOut, []byte("not found")), nil
}

// names lists the entries of directory path.
func (r ext4Reader) names(ctx context.Context, path string) ([]string, error) {
	out, _, err := r.run(ctx, "ls -p "+path)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		// /inode/mode/uid/gid/name/size/
		f := strings.Split(line, "/")
		if len(f) >= 7 && f[5] != "." && f[5] != ".." && strings.HasPrefix(f[2], "10") {
			names = append(names, f[5])
		}
	}
	slices.Sort(names)
	return names, nil
}

// guestCheck says whether the root filesystem of an image has what the
// node's seed needs: cloud-init, not disabled, with NoCloud among its
// datasources. chain is the image and the layers under it, top first,
// and head the start of the disk they make (bootForm's). It returns a
// 400 naming what is missing, nil when the image has it, and nil too
// when the root filesystem cannot be read here (not ext4: XFS, btrfs; no
// Linux partition), which is then logged.
func guestCheck(ctx context.Context, chain []storage.ImageInfo, head []byte, form baseForm, scratch string) (checked bool, err error) {
	img := chain[0].Image
	root, ok := rootCandidate(head, form, chain[0].VirtualSize)
	if !ok {
		return false, nil
	}
	path, offset := img.Path, root.offset
	if len(chain) > 1 || img.Format != storage.FormatRaw {
		// debugfs reads raw bytes: the partition is copied out, sparse.
		path = filepath.Join(scratch, "root-partition.tmp")
		defer os.Remove(path)
		if err := extractRange(ctx, storage.Images(chain), root, path); err != nil {
			return false, fmt.Errorf("read the root partition of the base image: %w", err)
		}
		offset = 0
	}
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	r := ext4Reader{file: f, offset: offset}
	osRelease, err := r.exists(ctx, "/etc/os-release")
	if err != nil {
		return false, nil // not ext4: not checked here
	}
	if alt, _ := r.exists(ctx, "/usr/lib/os-release"); !osRelease && !alt {
		return false, nil // not a root filesystem
	}
	refuse := func(why string) error {
		msg := "base image refused: " + why + "; the node configures an instance (its SSH keys, network and hostname) through cloud-init's NoCloud datasource (see docs/building-images.md)"
		return &execution.Error{Status: 400, Msg: msg, Err: errors.New(msg)}
	}
	found := false
	for _, p := range []string{"/usr/bin/cloud-init", "/bin/cloud-init", "/usr/local/bin/cloud-init"} {
		if ok, err := r.exists(ctx, p); err != nil {
			return false, err
		} else if ok {
			found = true
			break
		}
	}
	if !found {
		return true, refuse("its root filesystem has no cloud-init (no /usr/bin/cloud-init)")
	}
	if ok, err := r.exists(ctx, "/etc/cloud/cloud-init.disabled"); err != nil {
		return false, err
	} else if ok {
		return true, refuse("cloud-init is disabled in it (/etc/cloud/cloud-init.disabled)")
	}
	list, where, err := datasourceList(ctx, r)
	if err != nil {
		return false, err
	}
	if list != nil && !slices.ContainsFunc(list, func(s string) bool { return strings.EqualFold(s, "NoCloud") }) {
		return true, refuse(fmt.Sprintf("its cloud-init looks only at the datasources %v (%s), not NoCloud", list, where))
	}
	return true, nil
}

// datasourceList reads cloud-init's datasource_list as the image sets it:
// /etc/cloud/cloud.cfg, then the files of /etc/cloud/cloud.cfg.d in
// order, the last that sets it winning. Nil when none does (every
// datasource cloud-init knows, NoCloud among them).
func datasourceList(ctx context.Context, r ext4Reader) (list []string, where string, err error) {
	files := []string{"/etc/cloud/cloud.cfg"}
	names, err := r.names(ctx, "/etc/cloud/cloud.cfg.d")
	if err != nil {
		return nil, "", err
	}
	for _, n := range names {
		if strings.HasSuffix(n, ".cfg") {
			files = append(files, "/etc/cloud/cloud.cfg.d/"+n)
		}
	}
	for _, file := range files {
		data, err := r.cat(ctx, file)
		if errors.Is(err, errNoFile) {
			continue
		}
		if err != nil {
			return nil, "", err
		}
		var cfg struct {
			DatasourceList []string `yaml:"datasource_list"`
		}
		if yaml.Unmarshal(data, &cfg) != nil {
			continue // cloud-init skips a file it cannot parse too
		}
		if cfg.DatasourceList != nil {
			list, where = cfg.DatasourceList, file
		}
	}
	return list, where, nil
}

// extractRange writes what a guest sees of chain (top first) in e to dst,
// a sparse raw file, through the chain the node built (chainJSON).
func extractRange(ctx context.Context, chain []storage.Image, e extent, dst string) error {
	spec, err := chainJSON(chain)
	if err != nil {
		return err
	}
	src := fmt.Sprintf(`json:{"driver":"raw","offset":%d,"size":%d,"file":%s}`, e.offset, e.size, spec)
	cmd := exec.CommandContext(ctx, "qemu-img", "convert", "-O", "raw", src, dst)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img convert: %v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}
