package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/message"
)

// fakeDisk is a cache filesystem of a given size: what is free is what the
// store's files and .part files leave, less what others take.
type fakeDisk struct {
	mu    sync.Mutex
	size  int64
	calls int
}

func (d *fakeDisk) free(dir string) (int64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls++
	used := int64(0)
	filepath.Walk(filepath.Dir(dir), func(_ string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			used += info.Size()
		}
		return nil
	})
	return d.size - used, nil
}

func TestFreeSpaceFloor(t *testing.T) {
	const floor = 100 << 20
	data := randomBytes(t, 4<<20)
	cases := []struct {
		name     string
		disk     int64 // bytes of the fake filesystem
		declared bool
		wantErr  bool
		noGET    bool
	}{
		{"no room for the declared size", floor + 3<<20, true, true, true},
		{"no room at all", floor, false, true, true},
		{"undeclared size runs out of room", floor + 1<<20, false, true, false},
		{"room enough", floor + 5<<20, true, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			core := newFakeCore(t)
			core.noLength = true
			dir := t.TempDir()
			disk := &fakeDisk{size: tc.disk}
			opts := Options{APIServer: core.URL, MinFreeSpace: floor, FreeSpace: disk.free}
			largest := watchParts(t, dir, &opts)
			s := newTestStore(t, dir, opts)
			sum := message.SHA256Hex(data)
			core.addFile(sum, data)
			content := map[string]any{"item_hash": sum}
			if tc.declared {
				content["size"] = len(data)
			}
			ref, raw := storeMessage(t, content)
			core.addMessage(ref, raw)

			item, err := s.Fetch(context.Background(), ref, false)
			if !tc.wantErr {
				if err != nil {
					t.Fatal(err)
				}
				checkItem(t, item, data)
				item.Release()
				return
			}
			if !errors.Is(err, ErrInsufficientStorage) {
				t.Fatalf("err = %v, want ErrInsufficientStorage", err)
			}
			if room := tc.disk - floor; largest.Load() > room {
				t.Errorf("%d bytes written where %d were above the floor", largest.Load(), room)
			}
			if hits := core.fileHits(sum); tc.noGET != (hits == 0) {
				t.Errorf("%d requests for the file", hits)
			}
			checkClean(t, s)
			if s.reserved.Load() != 0 {
				t.Errorf("%d bytes still reserved", s.reserved.Load())
			}
		})
	}
}

func TestFreeSpaceReservedForDownloadsUnderWay(t *testing.T) {
	const floor = 100 << 20
	core := newFakeCore(t)
	dir := t.TempDir()
	disk := &fakeDisk{size: floor + 5<<20} // room for one of the two files
	s := newTestStore(t, dir, Options{APIServer: core.URL, MinFreeSpace: floor, FreeSpace: disk.free})
	first, second := randomBytes(t, 3<<20), randomBytes(t, 3<<20)
	firstRef, secondRef := remoteFile(t, core, first), remoteFile(t, core, second)
	core.gate, core.gated = make(chan struct{}), message.SHA256Hex(first)

	done := make(chan error, 1)
	go func() {
		item, err := s.Fetch(context.Background(), firstRef, false)
		if err == nil {
			item.Release()
		}
		done <- err
	}()
	for core.fileHits(core.gated) == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	// Nothing is written yet, but the first download has its 3 MiB.
	if _, err := s.Fetch(context.Background(), secondRef, false); !errors.Is(err, ErrInsufficientStorage) {
		t.Errorf("a second download that does not fit beside the first: %v", err)
	}
	close(core.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if s.reserved.Load() != 0 {
		t.Errorf("%d bytes still reserved after the download", s.reserved.Load())
	}
}

func TestStatfsFree(t *testing.T) {
	free, err := statfsFree(t.TempDir())
	if err != nil || free <= 0 {
		t.Errorf("statfs: %d, %v", free, err)
	}
	if _, err := statfsFree(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("statfs of a missing directory")
	}
}
