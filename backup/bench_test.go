package backup

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// renamingInstances puts a restored disk in place as instance.Manager
// does (a rename in the disks' directory), without a VM to restart.
type renamingInstances struct {
	vm   VM
	dest string
}

func (r *renamingInstances) BackupVM(context.Context, message.ItemHash, bool) (VM, error) {
	return r.vm, nil
}

func (r *renamingInstances) RootDiskSizeMiB(context.Context, message.ItemHash) (int64, error) {
	return 4096, nil
}

func (r *renamingInstances) ReplaceRootDisk(_ context.Context, _ message.ItemHash, path string, move bool) error {
	return os.Rename(path, r.dest)
}

// benchDisk makes an instance's root disk of 4 GiB with 1 GiB written: a
// qcow2 layer over an empty raw base, holding 1 MiB every 4 MiB, each
// half random and half text (compressible as files are).
func benchDisk(b *testing.B, dir string) VM {
	const size, chunk = 4 << 30, 1 << 20
	base := filepath.Join(dir, "base")
	data := filepath.Join(dir, "data.raw")
	for _, p := range []string{base, data} {
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		f.Truncate(size)
		f.Close()
	}
	f, _ := os.OpenFile(data, os.O_WRONLY, 0)
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, chunk)
	text := []byte("alephvm backup benchmark: a line of text as a log file or source would hold it, 0123456789\n")
	for off := int64(0); off < size; off += 4 * chunk {
		for i := 0; i < chunk/2; i += 8 {
			v := rng.Uint64()
			for j := range 8 {
				buf[i+j] = byte(v >> (8 * j))
			}
		}
		for i := chunk / 2; i < chunk; i++ {
			buf[i] = text[i%len(text)]
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	root := filepath.Join(dir, "rootfs.qcow2")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536,lazy_refcounts=on",
		"-B", base, "-F", "raw", data, root).CombinedOutput(); err != nil {
		b.Fatalf("make the disk: %v\n%s", err, out)
	}
	os.Remove(data)
	return VM{Disks: []Disk{{Member: "rootfs.qcow2", Image: storage.Image{Path: root, Format: storage.FormatQCOW2},
		Backing: []hypervisor.Layer{{Path: base, Format: storage.FormatRaw}}}}, Pauser: &fakePauser{}}
}

// BenchmarkBackupRestore times a backup and a restore of a 4 GiB disk
// with 1 GiB written, each as a ratio to a qemu-img convert of the same
// disk run beside it: plain (-O qcow2) and compressed as the backup
// compresses (-c -o compression_type=zstd, the default; the reference's
// zlib is timed too, for the record). The backup is the whole job (pause, convert, check,
// tar with its sha256, sidecars); the restore is the node's part of it
// (the upload written to disk, its header read, qemu-img check, the
// disk moved into place), without the VM's restart. The medians of the
// rounds are printed and reported.
func BenchmarkBackupRestore(b *testing.B) {
	testenv.RequireTools(b, "qemu-img")
	dir := b.TempDir()
	vm := benchDisk(b, dir)
	chain := imageOpts(vm.Disks[0])
	inst := &renamingInstances{vm: vm, dest: filepath.Join(dir, "restored.qcow2")}
	m, err := New(Options{Dir: filepath.Join(dir, "backups"), Keep: 1, MaxAge: time.Nanosecond, Secret: testSecret, Instances: inst})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	timeIt := func(f func()) time.Duration { start := time.Now(); f(); return time.Since(start) }
	convert := func(args ...string) func() {
		return func() {
			out := filepath.Join(dir, "plain.qcow2")
			defer os.Remove(out)
			if o, err := exec.Command("qemu-img", append(append([]string{"convert", "-U", "--image-opts", chain, "-O", "qcow2"}, args...), out)...).CombinedOutput(); err != nil {
				b.Fatalf("convert: %v\n%s", err, o)
			}
		}
	}
	var plain, compressed, zlib, backups, restores []time.Duration
	var backupSize int64
	for b.Loop() {
		plain = append(plain, timeIt(convert()))
		compressed = append(compressed, timeIt(convert("-c", "-o", "compression_type=zstd")))
		zlib = append(zlib, timeIt(convert("-c")))
		var meta *Meta
		backups = append(backups, timeIt(func() {
			if a, err := m.Create(ctx, testVM, Request{SkipFreeze: true}); err != nil || a.Status != 202 {
				b.Fatalf("create: %+v %v", a, err)
			}
			for {
				if a := m.Status(testVM); a.Status != 202 {
					if a.Status != 200 {
						b.Fatalf("backup: %+v", a)
					}
					meta = a.Meta
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
		}))
		backupSize = meta.Size
		// The upload: the backup's rootfs.qcow2, read from the page
		// cache as a client's bytes would arrive.
		member := filepath.Join(dir, "upload.qcow2")
		extract(b, filepath.Join(m.opts.Dir, meta.BackupID+tarSuffix), member)
		restores = append(restores, timeIt(func() {
			up, _ := os.Open(member)
			defer up.Close()
			if err := m.Restore(ctx, testVM, Restore{Upload: up, ContentLength: -1}); err != nil {
				b.Fatalf("restore: %v", err)
			}
		}))
		os.Remove(member)
		os.Remove(inst.dest)
		m.Delete(testVM, meta.BackupID)
	}
	med := func(d []time.Duration) time.Duration {
		s := append([]time.Duration{}, d...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)/2]
	}
	p, c, z, bk, rs := med(plain), med(compressed), med(zlib), med(backups), med(restores)
	b.ReportMetric(bk.Seconds()/p.Seconds(), "backup/convert")
	b.ReportMetric(bk.Seconds()/c.Seconds(), "backup/convert-c")
	b.ReportMetric(rs.Seconds()/p.Seconds(), "restore/convert")
	b.ReportMetric(rs.Seconds()/c.Seconds(), "restore/convert-c")
	fmt.Printf("4 GiB disk, 1 GiB written, %d rounds (medians): qemu-img convert %s, convert -c zstd %s (zlib %s); backup %s (tar %d MiB): %.2fx convert, %.2fx convert -c; restore %s: %.2fx convert, %.2fx convert -c\n",
		len(plain), p.Round(time.Millisecond), c.Round(time.Millisecond), z.Round(time.Millisecond), bk.Round(time.Millisecond), backupSize>>20,
		bk.Seconds()/p.Seconds(), bk.Seconds()/c.Seconds(), rs.Round(time.Millisecond), rs.Seconds()/p.Seconds(), rs.Seconds()/c.Seconds())
}

func extract(b *testing.B, tarPath, dst string) {
	f, err := os.Open(tarPath)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	if _, err := tr.Next(); err != nil {
		b.Fatal(err)
	}
	out, _ := os.Create(dst)
	defer out.Close()
	if _, err := io.Copy(out, tr); err != nil {
		b.Fatal(err)
	}
}
