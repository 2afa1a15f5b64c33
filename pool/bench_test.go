package pool

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"
)

// BenchmarkAcquireRelease measures a request's lease of a warm program,
// from every P at once: the cost the proxy pays per request.
func BenchmarkAcquireRelease(b *testing.B) {
	l := &fakeLauncher{memory: 128}
	p := New(Options{Launcher: l, Capacity: Capacity{MemoryMiB: 1024, VCPUs: 8}, ReuseTimeout: time.Minute,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	b.Cleanup(func() { p.Shutdown(context.Background()) })
	ctx := context.Background()
	lease, err := p.Acquire(ctx, ref)
	if err != nil {
		b.Fatal(err)
	}
	lease.Release()
	b.ReportAllocs()
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			lease, err := p.Acquire(ctx, ref)
			if err != nil {
				b.Error(err)
				return
			}
			lease.Release()
		}
	})
}
