package instance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/alephvm/alephvm/backup"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// ErrRunning is a layer asked of an instance that runs: its root disk is
// being written.
var ErrRunning = errors.New("the instance is running: stop it first (alephvm vm stop); a layer of a running instance is not made")

// LayerSource is what a layer is made from: a stopped QEMU instance's
// disks directory (VolumesDir/<ref>) and the item its root disk was made
// over.
type LayerSource struct {
	Disks  string
	Parent message.ItemHash
}

// FindLayerSource finds the disks of instance ref under volumesDir, with
// its record and message, for MakeLayer. The parent is the item the
// instance's base was linked from (recorded at its first start); for an
// instance older than that record, its message's rootfs.parent.ref,
// unless the message asks for the latest amend, which may have changed
// since.
func FindLayerSource(ctx context.Context, records *execution.Records, st execution.Store, volumesDir string, ref message.ItemHash) (LayerSource, error) {
	return findLayerSource(ctx, records, st, volumesDir, ref, false)
}

func findLayerSource(ctx context.Context, records *execution.Records, st execution.Store, volumesDir string, ref message.ItemHash, running bool) (LayerSource, error) {
	rec, err := records.Get(ctx, ref)
	if err != nil {
		return LayerSource{}, fmt.Errorf("instance %s: not hosted by this node: %w", ref, err)
	}
	if rec.Kind != execution.KindInstance {
		return LayerSource{}, fmt.Errorf("%s is a %s, not an instance", ref, rec.Kind)
	}
	if rec.HypervisorName() != hypervisor.QEMU {
		return LayerSource{}, fmt.Errorf("instance %s runs under %s: only a QEMU instance's root disk is a qcow2 layer", ref, rec.HypervisorName())
	}
	if !running && rec.State != execution.StateStopped {
		return LayerSource{}, fmt.Errorf("instance %s: %w", ref, ErrRunning)
	}
	src := LayerSource{Disks: filepath.Join(volumesDir, string(ref))}
	if b, err := os.ReadFile(filepath.Join(src.Disks, baseRefFile)); err == nil {
		src.Parent = message.ItemHash(strings.TrimSpace(string(b)))
	} else if !errors.Is(err, os.ErrNotExist) {
		return LayerSource{}, err
	} else {
		msg, _, err := st.Message(ctx, ref)
		if err != nil {
			return LayerSource{}, execution.StoreError("Message", ref, err)
		}
		c, ok := msg.Content.(*message.InstanceContent)
		if !ok {
			return LayerSource{}, fmt.Errorf("message %s is not an INSTANCE", ref)
		}
		if c.Rootfs.Parent.UseLatest {
			return LayerSource{}, fmt.Errorf("instance %s: which amend of %s its disk was made over is not recorded (start it once with this node's version)", ref, c.Rootfs.Parent.Ref)
		}
		src.Parent = c.Rootfs.Parent.Ref
	}
	if !src.Parent.IsSHA256() {
		return LayerSource{}, fmt.Errorf("instance %s: its parent %q is not an item hash a layer can name", ref, src.Parent)
	}
	return src, nil
}

// MakeLayer writes at dst a qcow2 layer holding what the stopped
// instance's root disk holds over its base, and nothing of the base: a
// copy of its root disk (reflinked where the filesystem can) whose
// backing file names src.Parent by item hash (aleph://), with the base's
// format. The node refuses to open a root disk QEMU still holds.
func MakeLayer(ctx context.Context, src LayerSource, dst string) error {
	root := filepath.Join(src.Disks, rootDiskFile)
	info, err := layerRoot(ctx, src)
	if err != nil {
		return err
	}
	// qemu-img takes the lock QEMU holds on a disk it writes; -U is not
	// given, so an instance started meanwhile is found here.
	if err := qemuImg(ctx, "info", "-f", storage.FormatQCOW2, root); err != nil {
		return fmt.Errorf("layer of %s: its root disk is in use (%w): %w", root, err, ErrRunning)
	}
	return finishLayer(ctx, src, info, dst, func(tmp string) error {
		_, err := storage.CloneFile(root, tmp)
		return err
	})
}

// layerRoot reads the root disk a layer is made of: a qcow2 layer over
// the instance's base, as the node made it.
func layerRoot(ctx context.Context, src LayerSource) (storage.ImageInfo, error) {
	root := filepath.Join(src.Disks, rootDiskFile)
	info, err := storage.Inspect(ctx, storage.Image{Path: root, Format: storage.FormatQCOW2})
	if err != nil {
		return info, fmt.Errorf("layer of %s: %w", root, err)
	}
	switch base := filepath.Join(src.Disks, "base"); {
	case info.BackingFile == "":
		return info, fmt.Errorf("layer of %s: the root disk was restored from a backup and holds the whole disk: store it as an image (alephvm store add)", root)
	case info.BackingFile != base || info.DataFile || info.Encrypted:
		return info, fmt.Errorf("layer of %s: the root disk is not a layer over %s", root, base)
	}
	return info, nil
}

// finishLayer has copy write the root disk to a temporary file beside
// dst, mends it and names its parent by item hash, then moves it to dst.
func finishLayer(ctx context.Context, src LayerSource, info storage.ImageInfo, dst string, copy func(tmp string) error) error {
	root := info.Path
	tmp := dst + ".tmp"
	_ = os.Remove(tmp)
	defer os.Remove(tmp)
	if err := copy(tmp); err != nil {
		return fmt.Errorf("layer of %s: %w", root, err)
	}
	steps := [][]string{
		// A disk left by a VM that was killed, or copied while its VM
		// ran, has refcounts to mend; its backing is not opened (it may
		// be a layer: aleph://).
		{"check", "-q", "-r", "all", "--image-opts", "driver=qcow2,file.driver=file,file.filename=" + strings.ReplaceAll(tmp, ",", ",,") + ",backing="},
		{"rebase", "-u", "-f", storage.FormatQCOW2, "-b", storage.LayerBacking(src.Parent), "-F", info.BackingFormat, tmp},
	}
	for _, args := range steps {
		if err := qemuImg(ctx, args...); err != nil {
			return fmt.Errorf("layer of %s: %w", root, err)
		}
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("layer of %s: %w", root, err)
	}
	return nil
}

// MakeRunningLayer is MakeLayer for a running QEMU instance of this
// manager: its root disk is copied (reflinked where the filesystem can)
// while the guest's filesystems are frozen by its agent, else while the
// VM is paused, as for a backup, and the answer says which.
func (m *Manager) MakeRunningLayer(ctx context.Context, ref message.ItemHash, dst string) (LayerSource, backup.Consistency, error) {
	src, err := findLayerSource(ctx, m.opts.Records, m.opts.Store, m.opts.VolumesDir, ref, true)
	if err != nil {
		return LayerSource{}, "", err
	}
	info, err := layerRoot(ctx, src)
	if err != nil {
		return LayerSource{}, "", err
	}
	vm, err := m.BackupVM(ctx, ref, false)
	if errors.Is(err, backup.ErrNotRunning) {
		return LayerSource{}, "", &backup.Error{Status: 400, Msg: "VM must be running for the node to make its layer; a stopped instance's is made by alephvm image layer on the node's machine"}
	}
	if err != nil {
		return LayerSource{}, "", err
	}
	var consistency backup.Consistency
	err = finishLayer(ctx, src, info, dst, func(tmp string) error {
		c, settle, err := backup.Quiesce(ctx, vm, false, m.opts.Log.With("ref", ref))
		if err != nil {
			return err
		}
		defer settle()
		consistency = c
		_, err = storage.CloneFile(info.Path, tmp)
		return err
	})
	return src, consistency, err
}

func qemuImg(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "qemu-img", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img %s: %w: %s", args[0], err, bytes.TrimSpace(out))
	}
	return nil
}
