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
	for i := range b.N {
		for j, size := range sizes {
			disk := filepath.Join(dir, fmt.Sprintf("disk-%d-%d.qcow2", i, j))
			start := time.Now()
			if err := CreateOverlay(ctx, parent, disk, size); err != nil {
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
