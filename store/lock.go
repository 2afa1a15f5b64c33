package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Files are locked with flock(2), which other processes sharing the store
// see too and which the kernel drops when its holder dies:
//   - a pinned file (an Item not yet released) holds a shared lock, and
//     eviction deletes only a file whose exclusive lock it can take;
//   - a .part file being written holds an exclusive lock, until its blob
//     is renamed into place and indexed.

// lockShared waits for a shared lock on f.
func lockShared(f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_SH)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// tryLockExclusive takes an exclusive lock on f if no one holds any.
func tryLockExclusive(f *os.File) (bool, error) {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return false, nil
	}
	return err == nil, err
}

// lockExclusive waits for an exclusive lock on f, polling so that ctx can
// end the wait.
func lockExclusive(ctx context.Context, f *os.File) error {
	wait := 10 * time.Millisecond
	for {
		ok, err := tryLockExclusive(f)
		if ok || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", f.Name(), context.Cause(ctx))
		case <-time.After(wait):
			wait = min(2*wait, time.Second)
		}
	}
}

// stillAt reports whether f is still the file at its path: it may have been
// renamed or deleted while its opener waited for a lock.
func stillAt(f *os.File) bool {
	a, err := f.Stat()
	if err != nil {
		return false
	}
	b, err := os.Stat(f.Name())
	return err == nil && os.SameFile(a, b)
}

// syncDir makes a rename or a removal in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
