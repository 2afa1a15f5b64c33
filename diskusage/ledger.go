package diskusage

import (
	"fmt"
	"sync"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// Ledger promises disk space to VMs: a VM is checked before anything is
// made for it, against the free space less the reserve and less what the
// VMs already admitted may still write (their disks' sizes less what
// their sparse files already take), and holds its promise until it is
// gone.
type Ledger struct {
	space Space
	dir   string // the filesystem checked (the volumes' directory)
	mu    sync.Mutex
	next  int
	held  map[int]promise
}

type promise struct {
	size int64
	dirs []string // where its disks are: what they take counts against size
}

// NewLedger checks space in the filesystem of dir.
func NewLedger(dir string, space Space) *Ledger {
	if space.Free == nil {
		space.Free = storage.StatfsFree
	}
	return &Ledger{space: space, dir: dir, held: map[int]promise{}}
}

func allocatedIn(dirs []string) int64 {
	var n int64
	for _, d := range dirs {
		if s, _, err := measure(d); err == nil {
			n += s.allocated
		}
	}
	return n
}

// Reserve promises size bytes to what (named in the error), whose disks
// are under dirs, or refuses with ErrNoSpace. release ends the promise;
// it may be called more than once.
func (l *Ledger) Reserve(what string, size int64, dirs ...string) (release func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	need := max(size-allocatedIn(dirs), 0)
	if err := l.space.Check(l.dir, what, need, l.promisedLocked()); err != nil {
		return nil, err
	}
	return l.holdLocked(size, dirs), nil
}

// promisedLocked is what the VMs holding promises may still write: their
// disks' sizes less what their files already take.
func (l *Ledger) promisedLocked() int64 {
	var promised int64
	for _, p := range l.held {
		promised += max(p.size-allocatedIn(p.dirs), 0)
	}
	return promised
}

// Available is what a new VM's disks may still take: the free space less
// the reserve and less what is promised, as Reserve counts it.
func (l *Ledger) Available() (int64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	free, err := l.space.Free(l.dir)
	if err != nil {
		return 0, fmt.Errorf("free space of %s: %w", l.dir, err)
	}
	return max(free-l.space.Reserve-l.promisedLocked(), 0), nil
}

// Hold promises size bytes whatever the free space: for a VM that runs
// already, found by a restarted node.
func (l *Ledger) Hold(size int64, dirs ...string) (release func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.holdLocked(size, dirs)
}

func (l *Ledger) holdLocked(size int64, dirs []string) func() {
	id := l.next
	l.next++
	l.held[id] = promise{size: size, dirs: dirs}
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			delete(l.held, id)
		})
	}
}

// DiskBytes is what a VM's root disk (rootMiB, 0 for a program) and its
// writable volumes may take once fully written.
func DiskBytes(rootMiB int64, volumes []message.MachineVolume) int64 {
	n := rootMiB << 20
	for _, v := range volumes {
		if k := v.Kind(); k == message.VolumeEphemeral || k == message.VolumePersistent {
			n += v.SizeMiB << 20
		}
	}
	return n
}
