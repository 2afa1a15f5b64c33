package storage

import (
	"errors"
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

// WriteFileDurable writes data to path so that a crash leaves either the
// previous file or the new one, whole: a synced temporary file renamed
// into place, then the directory synced.
func WriteFileDurable(path string, data []byte, perm os.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err := commitTemp(f, path, err); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// commitTemp ends the writing of f, a temporary file, which err says
// failed or not: when it did not, f is synced, closed and renamed to path
// (the directory synced); when anything failed, f is closed and removed.
func commitTemp(f *os.File, path string, err error) error {
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = renameSynced(f.Name(), path)
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return err
}

// RemoveLeftovers removes from each VM's directory under dir (a volumes
// directory) what a process killed while making a disk or a seed leaves:
// entries named "*.tmp", the names disks and seeds are made under before
// their rename. Call it only while nothing makes disks there, as when the
// node starts. It returns what it removed.
func RemoveLeftovers(dir string) ([]string, error) {
	vms, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, vm := range vms {
		if !vm.IsDir() {
			continue
		}
		leftovers, err := filepath.Glob(filepath.Join(dir, vm.Name(), "*.tmp"))
		if err != nil {
			return removed, err
		}
		for _, p := range leftovers {
			if err := os.RemoveAll(p); err != nil {
				errs = append(errs, err)
				continue
			}
			removed = append(removed, p)
		}
	}
	return removed, errors.Join(errs...)
}
