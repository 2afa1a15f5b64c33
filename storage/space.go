package storage

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Disks makes the disks VMs write to (CreateOverlay, CreateRawDisk,
// CreateVolume), refusing one its filesystem cannot hold. The zero value
// reads free space with statfs and keeps no floor.
type Disks struct {
	// Free returns the bytes the node may still write in the filesystem
	// holding dir; nil means statfs (the space available to unprivileged
	// users, so that the root-reserved blocks stay for the host).
	Free func(dir string) (int64, error)
	// Floor is the free space every disk must leave once it is fully
	// written.
	Floor int64
}

// ErrNoSpace is what a disk refused for lack of space is (errors.Is); a
// client gets 507 Insufficient Storage.
var ErrNoSpace = errors.New("not enough disk space")

// StatfsFree returns the bytes available to unprivileged users in the
// filesystem holding dir.
func StatfsFree(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("free space of %s: %w", dir, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// reserve refuses a disk of what (a name for the message) that may grow by
// need bytes in dir when the filesystem cannot hold them plus the floor.
// It reserves nothing: disks made at the same time each see the same free
// space (admission, which knows every VM's disks, is the place for that).
func (d Disks) reserve(dir, what string, need int64) error {
	if need <= 0 {
		return nil
	}
	free := d.Free
	if free == nil {
		free = StatfsFree
	}
	avail, err := free(dir)
	if err != nil {
		return err
	}
	if need > avail-d.Floor {
		return &Error{Status: 507, Kind: ErrNoSpace,
			Msg: fmt.Sprintf("not enough disk space for %s of %d MiB: the node's disk has %d MiB free and keeps %d MiB free",
				what, need>>20, max(avail, 0)>>20, d.Floor>>20)}
	}
	return nil
}
