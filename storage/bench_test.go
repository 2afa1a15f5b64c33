package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testenv"
)

// BenchmarkCreateOverlay times root disks of 1, 10 and 100 GiB over the
// same base and reports the 100 GiB / 1 GiB ratio of one run: creation
// must not grow with the disk's size.
func BenchmarkCreateOverlay(b *testing.B) {
	testenv.RequireTools(b, "qemu-img")
	ctx := context.Background()
	dir := b.TempDir()
	parent := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(parent, make([]byte, 1<<20), 0o600); err != nil {
		b.Fatal(err)
	}
	sizes := []int64{1 << 10, 10 << 10, 100 << 10}
	total := make([]time.Duration, len(sizes))
	// The disks are sparse: let the largest be made on any filesystem.
	disks := Disks{Free: func(string) (int64, error) { return 1 << 50, nil }}
	for i := range b.N {
		for j, size := range sizes {
			disk := filepath.Join(dir, fmt.Sprintf("disk-%d-%d.qcow2", i, j))
			start := time.Now()
			if err := disks.CreateOverlay(ctx, Image{Path: parent, Format: FormatRaw}, disk, size); err != nil {
				b.Fatal(err)
			}
			total[j] += time.Since(start)
			os.Remove(disk)
		}
	}
	for j, size := range sizes {
		b.ReportMetric(float64(total[j].Microseconds())/float64(b.N)/1000, fmt.Sprintf("ms/%dGiB", size>>10))
	}
	b.ReportMetric(float64(total[2])/float64(total[0]), "ratio-100G/1G")
}

// BenchmarkCreateRawDisk times a Firecracker root disk of 1 GiB over a
// 256 MiB base holding 128 MiB of data, by reflink (on a loop-mounted xfs)
// and by copy (on the temporary directory), growth included.
func BenchmarkCreateRawDisk(b *testing.B) {
	testenv.RequireTools(b, "mkfs.ext4", "dd")
	ctx := context.Background()
	log, _ := captureLog()
	for _, tc := range []struct {
		name string
		dir  func(testing.TB) string
	}{
		{"reflink", func(tb testing.TB) string { return mountXFS(tb) }},
		{"copy", func(tb testing.TB) string { return tb.TempDir() }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			dir := tc.dir(b)
			content := filepath.Join(dir, "content")
			os.Mkdir(content, 0o755)
			testenv.Cmd(b, "dd", "if=/dev/urandom", "of="+filepath.Join(content, "data"), "bs=1M", "count=128", "status=none")
			parent := filepath.Join(dir, "base.ext4")
			testenv.Cmd(b, "mkfs.ext4", "-q", "-d", content, parent, "256M")
			b.ResetTimer()
			for i := range b.N {
				disk := filepath.Join(dir, fmt.Sprint("vm", i))
				os.Mkdir(disk, 0o700)
				if _, err := (Disks{}).CreateRawDisk(ctx, parent, disk, "vm", 1024, log); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				os.RemoveAll(disk)
				b.StartTimer()
			}
		})
	}
}
