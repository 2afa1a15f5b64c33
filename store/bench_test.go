package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkThroughput compares, in one run, adding a file to the store and
// reading it back out (Fetch, then a copy to a new file, as "alephvm store
// get" does) with cp of the same file on the same disk:
//
//	go test ./store -run '^$' -bench Throughput -benchtime 4x
//
// The file is 1 GiB (ALEPHVM_BENCH_SIZE, in bytes, to change it), in
// ALEPHVM_BENCH_DIR (default: the test's temporary directory). Adding syncs
// the file before it is renamed into place, which cp does not, so the add
// is compared with both cp and cp followed by sync of the copy; the read
// with cp of the stored file. Every step starts with no dirty pages and the
// file it reads out of the page cache. A freshly written file reads slower
// for a while on a virtual disk, whoever reads it first, so the read and its
// cp take turns going first. Each ratio is of the fastest of b.N rounds
// (-benchtime 4x), as the disk is shared with whatever else the machine does.
func BenchmarkThroughput(b *testing.B) {
	size := int64(1 << 30)
	if v := os.Getenv("ALEPHVM_BENCH_SIZE"); v != "" {
		size, _ = strconv.ParseInt(v, 10, 64)
	}
	dir := os.Getenv("ALEPHVM_BENCH_DIR")
	if dir == "" {
		dir = b.TempDir()
	} else {
		var err error
		if dir, err = os.MkdirTemp(dir, "alephvm-bench-"); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
	}
	src := filepath.Join(dir, "source")
	writeRandomFile(b, src, size)

	timed := func(input string, fn func() error) time.Duration {
		b.Helper()
		unix.Sync()
		uncache(b, input)
		start := time.Now()
		if err := fn(); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	run := func(name string, args ...string) func() error {
		return func() error {
			if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
				return fmt.Errorf("%s: %v: %s", name, err, out)
			}
			return nil
		}
	}
	var cp, cpSync, add, cpStored, read time.Duration
	fastest := func(best *time.Duration, d time.Duration) {
		if *best == 0 || d < *best {
			*best = d
		}
	}
	for i := range b.N {
		b.StopTimer()
		s := newTestStore(b, filepath.Join(dir, fmt.Sprint("store", i)), Options{})
		dst := filepath.Join(dir, "copy")
		b.StartTimer()
		fastest(&cp, timed(src, run("cp", src, dst)))
		os.Remove(dst)
		fastest(&cpSync, timed(src, func() error { return errors.Join(run("cp", src, dst)(), run("sync", dst)()) }))
		os.Remove(dst)
		var added Added
		fastest(&add, timed(src, func() (err error) {
			added, err = s.AddFile(context.Background(), src)
			return err
		}))
		stored := s.blobPath(added.SHA256)
		cpRead := func() { fastest(&cpStored, timed(stored, run("cp", stored, dst))) }
		storeRead := func() {
			fastest(&read, timed(stored, func() error {
				item, err := s.Fetch(context.Background(), added.Ref, false)
				if err != nil {
					return err
				}
				defer item.Release()
				return copyFile(item.Path, dst)
			}))
		}
		first, second := cpRead, storeRead
		if i%2 == 1 {
			first, second = storeRead, cpRead
		}
		first()
		os.Remove(dst)
		second()
		os.Remove(dst)
		b.StopTimer()
		os.RemoveAll(filepath.Join(dir, fmt.Sprint("store", i)))
	}
	mbps := func(d time.Duration) float64 { return float64(size) / d.Seconds() / 1e6 }
	b.ReportMetric(cp.Seconds()/add.Seconds(), "add/cp")
	b.ReportMetric(cpSync.Seconds()/add.Seconds(), "add/cp+sync")
	b.ReportMetric(cpStored.Seconds()/read.Seconds(), "read/cp")
	b.Logf("%d MiB, fastest of %d round(s): cp %.0f MB/s, cp+sync %.0f MB/s, store add %.0f MB/s; cp of the stored file %.0f MB/s, store read %.0f MB/s",
		size>>20, b.N, mbps(cp), mbps(cpSync), mbps(add), mbps(cpStored), mbps(read))
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func writeRandomFile(b *testing.B, path string, size int64) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	rng := rand.NewChaCha8([32]byte{1})
	if _, err := io.CopyN(f, rng, size); err != nil {
		b.Fatal(err)
	}
}

// uncache drops a file's clean pages from the page cache.
func uncache(b *testing.B, path string) {
	b.Helper()
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}
