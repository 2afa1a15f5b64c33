package diskusage

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/message"
)

func TestLedger(t *testing.T) {
	dir := t.TempDir()
	free := int64(10 << 30)
	l := NewLedger(dir, Space{Free: func(string) (int64, error) { return free, nil }, Reserve: 2 << 30})
	relA, err := l.Reserve("instance a", 5<<30, filepath.Join(dir, "a"))
	if err != nil {
		t.Fatal(err)
	}
	// 10 free - 2 reserve - 5 promised = 3 left.
	_, err = l.Reserve("instance b", 4<<30, filepath.Join(dir, "b"))
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "instance b needs 4096 MiB") || !strings.Contains(err.Error(), "5120 MiB promised") {
		t.Fatalf("over the promise: %v", err)
	}
	// What a's sparse disk already takes is no longer promised (and the
	// free space shrank by as much).
	sparse(t, filepath.Join(dir, "a", "inst-a.qcow2"), 5<<30, 1<<20)
	free -= 1 << 20
	relB, err := l.Reserve("instance b", 3<<30-(1<<20), filepath.Join(dir, "b"))
	if err != nil {
		t.Fatalf("fits once a's disk is counted: %v", err)
	}
	relA()
	relA() // twice is once
	relB()
	if _, err := l.Reserve("instance c", 8<<30-(1<<20), filepath.Join(dir, "c")); err != nil {
		t.Fatalf("after the releases: %v", err)
	}
	// A disk that exists already needs only what it does not take yet.
	sparse(t, filepath.Join(dir, "d", "vol.ext4"), 1<<20, 1<<20)
	l2 := NewLedger(dir, Space{Free: func(string) (int64, error) { return 1 << 20, nil }})
	if _, err := l2.Reserve("instance d", 1<<20, filepath.Join(dir, "d")); err != nil {
		t.Fatalf("restart of an existing disk: %v", err)
	}
}

func TestDiskBytes(t *testing.T) {
	vols := []message.MachineVolume{
		{Ref: "x"},                     // immutable: from the store
		{Ephemeral: true, SizeMiB: 10}, // ephemeral
		{SizeMiB: 20, Persistence: new(message.Persistence)},
	}
	if got := DiskBytes(100, vols); got != 130<<20 {
		t.Fatalf("got %d MiB", got>>20)
	}
}

// TestLedgerAvailable: what the usage route reports is what Reserve
// would still grant.
func TestLedgerAvailable(t *testing.T) {
	dir := t.TempDir()
	l := NewLedger(dir, Space{Free: func(string) (int64, error) { return 10 << 30, nil }, Reserve: 2 << 30})
	if n, err := l.Available(); err != nil || n != 8<<30 {
		t.Fatalf("nothing promised: %d %v", n, err)
	}
	release, err := l.Reserve("instance a", 5<<30, filepath.Join(dir, "a"))
	if err != nil {
		t.Fatal(err)
	}
	sparse(t, filepath.Join(dir, "a", "inst-a.qcow2"), 5<<30, 1<<20)
	if n, err := l.Available(); err != nil || n != 3<<30+1<<20 {
		t.Errorf("5 GiB promised, 1 MiB of it written: %d %v", n, err)
	}
	if _, err := l.Reserve("instance b", 3<<30+2<<20, filepath.Join(dir, "b")); !errors.Is(err, ErrNoSpace) {
		t.Errorf("more than Available: %v", err)
	}
	release()
	full := NewLedger(dir, Space{Free: func(string) (int64, error) { return 1 << 30, nil }, Reserve: 2 << 30})
	if n, err := full.Available(); err != nil || n != 0 {
		t.Errorf("less free than the reserve: %d %v", n, err)
	}
}
