package firecracker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/hypervisor"
)

// jailUIDDir is the host-wide record of the uids handed to jails: a lock
// file, held by a node process from choosing a jail's uid until the jail
// is made, and a file per uid handed out, named after the uid, holding
// the path of its jail's root. It is the one place every node process of
// the host sees, whatever its jailer base directory.
const jailUIDDir = "/run/alephvm/jail-uids"

// jailUIDs hands out the uids of jails, one per jail, so that no two jails
// on the host share one, even when made by two node processes at once or
// under two jailer base directories (the tests' nodes, each in a temporary
// directory). A uid is taken when
//   - a jail under this node's base owns it: a jail's root is owned by its
//     uid from the moment it is made until it is removed, so the jails on
//     disk are the record across node restarts (and before this registry);
//   - its file in records names a path that exists and is owned by it: a
//     jail of another base, or of this one being made. A file naming a
//     path gone, or owned by another uid, is stale and removed: the jail
//     was removed without it (a crash, an older node);
//   - a process has it (read from proc): a Firecracker whose jail is gone.
//
// Records are read, written and removed only under the lock file, which
// makes choosing a uid and making its jail one step host-wide.
type jailUIDs struct {
	first   int
	records string // jailUIDDir but in tests
	proc    string // "/proc" but in tests
}

// lockFile is the name of the lock in the records directory: no uid.
const lockFile = "lock"

// lock takes the host-wide lock of the records, waiting for it; unlock
// releases it.
func (u jailUIDs) lock() (unlock func(), err error) {
	if err := os.MkdirAll(u.records, 0o700); err != nil {
		return nil, fmt.Errorf("jail uids: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(u.records, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("jail uids: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("jail uids: lock %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil // closing unlocks
}

// free returns the first of JailUIDs uids from u.first that is not taken
// (see jailUIDs), jails being the directory of this node's jails
// (<base>/<exec name>). It removes the stale records it finds. Call it
// under the lock.
func (u jailUIDs) free(jails string) (int, error) {
	used, err := jailOwners(jails)
	if err != nil {
		return 0, err
	}
	recorded, err := u.recorded()
	if err != nil {
		return 0, err
	}
	running, err := hypervisor.UIDsInUse(u.proc, u.first, JailUIDs)
	if err != nil {
		return 0, fmt.Errorf("jail uids: find the uids processes have: %w", err)
	}
	for uid := u.first; uid < u.first+JailUIDs; uid++ {
		if !used[uid] && !recorded[uid] && !running[uid] {
			return uid, nil
		}
	}
	return 0, fmt.Errorf("all %d jail uids from %d are in use", JailUIDs, u.first)
}

// jailOwners returns the uids that own a jail's root under dir.
func jailOwners(dir string) (map[int]bool, error) {
	used := map[int]bool{}
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list jails: %w", err)
	}
	for _, e := range entries {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(dir, e.Name(), "root"), &st) == nil {
			used[int(st.Uid)] = true
		}
	}
	return used, nil
}

// recorded returns the uids whose records name their jail's root, and
// removes the stale records. Call it under the lock.
func (u jailUIDs) recorded() (map[int]bool, error) {
	entries, err := os.ReadDir(u.records)
	if err != nil {
		return nil, fmt.Errorf("jail uids: %w", err)
	}
	used := map[int]bool{}
	for _, e := range entries {
		uid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue // the lock
		}
		current, err := u.current(uid)
		if err != nil {
			return nil, err
		}
		if current {
			used[uid] = true
		} else if err := u.drop(uid); err != nil {
			return nil, err
		}
	}
	return used, nil
}

func (u jailUIDs) recordPath(uid int) string {
	return filepath.Join(u.records, strconv.Itoa(uid))
}

// current reports whether uid's record names a path that exists and that
// uid owns.
func (u jailUIDs) current(uid int) (bool, error) {
	data, err := os.ReadFile(u.recordPath(uid))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("jail uids: %w", err)
	}
	var st unix.Stat_t
	root := strings.TrimSuffix(string(data), "\n")
	return root != "" && unix.Stat(root, &st) == nil && int(st.Uid) == uid, nil
}

// record writes down that uid is handed to the jail whose root is root,
// before the jail is made: should the node die before, the record names a
// path that does not exist and is stale. Call it under the lock.
func (u jailUIDs) record(uid int, root string) error {
	if err := os.WriteFile(u.recordPath(uid), []byte(root+"\n"), 0o600); err != nil {
		return fmt.Errorf("jail uids: record uid %d: %w", uid, err)
	}
	return nil
}

// drop removes uid's record. Call it under the lock.
func (u jailUIDs) drop(uid int) error {
	if err := os.Remove(u.recordPath(uid)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("jail uids: %w", err)
	}
	return nil
}

// forget removes uid's record once its jail is removed, unless the record
// is current (a new jail has the uid since). It takes the lock itself.
func (u jailUIDs) forget(uid int) error {
	unlock, err := u.lock()
	if err != nil {
		return err
	}
	defer unlock()
	current, err := u.current(uid)
	if err != nil || current {
		return err
	}
	return u.drop(uid)
}
