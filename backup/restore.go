package backup

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// Restore is where a restored root disk comes from: an upload (the
// multipart field rootfs, read once) or a stored item (volume_ref).
type Restore struct {
	Upload    io.Reader
	VolumeRef string
	// ContentLength is the request's, -1 when unknown: a body larger
	// than the disk may be is refused before it is read.
	ContentLength int64
}

var hexRef = regexp.MustCompile(`^[0-9a-f]+$`)

// Restore replaces ref's root disk with the qcow2 src gives (POST
// …/restore): it is checked (a standalone qcow2 that qemu-img check
// finds sound, its virtual size within the instance's rootfs.size_mib),
// then the instance is stopped, its disk swapped and the instance
// started. An upload is kept in the backups directory when the restore
// fails, as in the reference.
func (m *Manager) Restore(ctx context.Context, ref message.ItemHash, src Restore) error {
	m.mu.Lock()
	st := m.state(ref)
	if st.busy != "" {
		m.mu.Unlock()
		return refuse(409, "A backup or restore is already in progress for this VM")
	}
	st.busy = "restore"
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		st.busy = ""
		m.mu.Unlock()
	}()

	sizeMiB, err := m.opts.Instances.RootDiskSizeMiB(ctx, ref)
	if err != nil {
		return err
	}
	maxSize := sizeMiB << 20
	if src.Upload != nil {
		limit := min(maxSize, m.opts.MaxUpload)
		if src.ContentLength > limit {
			return tooLarge(limit, src.ContentLength)
		}
		path := filepath.Join(m.opts.Dir, "restore-"+string(ref)+".qcow2")
		if err := m.receive(ref, src.Upload, path, limit); err != nil {
			return err
		}
		if err := Validate(ctx, path, maxSize); err != nil {
			return err
		}
		if err := m.opts.Instances.ReplaceRootDisk(ctx, ref, path, true); err != nil {
			return err
		}
		os.Remove(path)
		return nil
	}
	if src.VolumeRef == "" {
		return refuse(400, "Missing volume_ref in JSON body")
	}
	if !hexRef.MatchString(src.VolumeRef) {
		return refuse(400, "Invalid volume_ref format")
	}
	if m.opts.Store == nil {
		return refuse(400, "This node fetches no stored items")
	}
	item, err := m.opts.Store.Fetch(ctx, message.ItemHash(src.VolumeRef), false)
	if err != nil {
		return err
	}
	defer item.Release()
	if err := Validate(ctx, item.Path, maxSize); err != nil {
		return err
	}
	// The store's file stays the store's: the instance gets a copy.
	return m.opts.Instances.ReplaceRootDisk(ctx, ref, item.Path, false)
}

// tooLarge is aiohttp's HTTPRequestEntityTooLarge, as the reference
// answers it.
func tooLarge(limit, actual int64) *Error {
	return refuse(413, "Maximum request body size %d exceeded, actual body size %d", limit, actual)
}

// receive streams an upload of at most limit bytes to path, with the
// disk space it may take promised first.
func (m *Manager) receive(ref message.ItemHash, r io.Reader, path string, limit int64) (err error) {
	if m.opts.Space != nil {
		release, err := m.opts.Space.Reserve("a restore upload for "+string(ref), limit, path)
		if err != nil {
			return &Error{Status: 507, Msg: "Insufficient disk space: " + err.Error(), Err: err}
		}
		defer release()
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	n, err := io.CopyBuffer(f, io.LimitReader(r, limit+1), make([]byte, 1<<20))
	if err == nil && n > limit {
		err = tooLarge(limit, n)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		var e *Error
		if !errors.As(err, &e) {
			err = refuse(400, "Could not read the upload: %v", err)
		}
		return err
	}
	return nil
}

// Validate accepts a restored root disk: a qcow2 (by its magic) that
// stands alone (storage.ImageInfo.Standalone: no backing file, data file
// or encryption, read from its header before any tool opens it), that
// qemu-img check finds sound, and whose virtual size is at most maxSize.
// A refusal is a 400 that says why.
func Validate(ctx context.Context, path string, maxSize int64) error {
	format, err := storage.DetectFormat(path)
	if err != nil {
		return refuse(400, "Uploaded file is not a valid QCOW2 disk image: %v", err)
	}
	if format != storage.FormatQCOW2 {
		return refuse(400, "Uploaded file is not a valid QCOW2 disk image")
	}
	info, err := storage.Inspect(ctx, storage.Image{Path: path, Format: storage.FormatQCOW2})
	if err != nil {
		return refuse(400, "Uploaded file is not a valid QCOW2 disk image: %v", err)
	}
	if err := info.Standalone(); err != nil {
		return refuse(400, "%v", err)
	}
	if err := check(ctx, path); err != nil {
		return refuse(400, "Uploaded file is not a valid QCOW2 disk image")
	}
	if info.VirtualSize > maxSize {
		return refuse(400, "New rootfs virtual size (%d bytes) exceeds declared rootfs size (%d bytes). Restore cannot increase disk size.",
			info.VirtualSize, maxSize)
	}
	return nil
}

// ErrNotQEMU and ErrNotRunning are the refusals of Instances, with the
// reference's texts.
var (
	ErrNotQEMU    = refuse(400, "Backup only supported for QEMU VMs")
	ErrNotRunning = refuse(400, "VM must be running to create backup")
)

// NotHosted is the answer for a VM the node does not host.
func NotHosted(ref message.ItemHash) error {
	return refuse(404, "No virtual machine with ref %s", ref)
}

// RestoreNotQEMU is the refusal of a restore of a VM that is not a QEMU
// instance.
var RestoreNotQEMU = refuse(400, "Restore only supported for QEMU VMs")
