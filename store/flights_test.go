package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestFlightsOutliveOneCallerNotAll(t *testing.T) {
	var g flights
	started, release := make(chan struct{}), make(chan struct{})
	runs := 0
	run := func(ctx context.Context) error {
		runs++
		close(started)
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	leaving, cancel := context.WithCancel(context.Background())
	left := make(chan error)
	go func() { left <- g.do(leaving, "k", run) }()
	<-started
	stays := make(chan error)
	go func() { stays <- g.do(context.Background(), "k", run) }()
	time.Sleep(20 * time.Millisecond) // let the second caller join
	cancel()
	if err := <-left; !errors.Is(err, context.Canceled) {
		t.Errorf("the caller that left got %v", err)
	}
	close(release)
	if err := <-stays; err != nil || runs != 1 {
		t.Errorf("the caller that stayed got %v after %d runs, want nil after 1", err, runs)
	}

	// When every caller leaves, the run is cancelled.
	cancelled := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	go g.do(ctx, "k2", func(ctx context.Context) error {
		<-ctx.Done()
		close(cancelled)
		return ctx.Err()
	})
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the run went on with no one waiting for it")
	}
}
