package storage

import (
	"fmt"
	"os"
	"path/filepath"
)

// Disks are made under a temporary name and renamed whole into place. A
// rename is only as durable as what it renames: without an fsync of the
// file first, a crash can leave the final name on an empty or partial
// file (ext4 and xfs order data and rename only with some mount options),
// which the next start would take for a made disk; without an fsync of
// the directory after, the rename itself can be lost.

// syncFile flushes the file at path, written by this process or another
// (qemu-img, mkfs), to the disk.
func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

// renameSynced renames tmp, already synced, to path and syncs the
// directory so that the rename survives a crash.
func renameSynced(tmp, path string) error {
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// syncDir flushes a directory's entries to the disk.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
