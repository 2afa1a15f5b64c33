package instance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/alephvm/alephvm/backup"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// The root disk's file among an instance's disks, the restored disk's
// before it takes its place, and the previous disk's until the instance
// has booted from the restored one.
const (
	rootDiskFile   = "rootfs.qcow2"
	restoreStaging = "rootfs.restore-staging.qcow2"
	preRestore     = "rootfs.pre-restore-"
)

// bootConfirmTimeout is how long a restored instance's guest agent is
// waited for before the previous disk is kept for the operator.
var bootConfirmTimeout = 10 * time.Minute

// backupVM is what a backup needs of a running QEMU VM (qemu.VM).
type backupVM interface {
	GuestAgentSocket() string
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
}

// BackupVM describes the disks of running QEMU instance ref for a backup:
// its root disk, as the VM opens it, and its persistent volumes when
// volumes is set.
func (m *Manager) BackupVM(ctx context.Context, ref message.ItemHash, volumes bool) (backup.VM, error) {
	if _, err := m.opts.Records.Get(ctx, ref); err != nil {
		return backup.VM{}, backup.NotHosted(ref)
	}
	iv := m.get(ref)
	if iv == nil {
		return backup.VM{}, backup.ErrNotRunning
	}
	vm, ok := iv.vm.(backupVM)
	if !ok {
		return backup.VM{}, backup.ErrNotQEMU
	}
	disks := filepath.Join(m.opts.VolumesDir, string(ref))
	root, err := rootDiskChain(ctx, disks, m.opts.LayerMaxDepth)
	if err != nil {
		return backup.VM{}, err
	}
	out := backup.VM{Disks: []backup.Disk{root}, GuestAgent: vm.GuestAgentSocket(), Pauser: vm}
	if volumes {
		entries, err := os.ReadDir(disks)
		if err != nil {
			return backup.VM{}, err
		}
		for _, e := range entries {
			if name := e.Name(); strings.HasPrefix(name, "volume-") && strings.HasSuffix(name, ".ext4") && e.Type().IsRegular() {
				out.Disks = append(out.Disks, backup.Disk{Member: strings.TrimSuffix(name, ".ext4") + ".qcow2",
					Image: storage.Image{Path: filepath.Join(disks, name), Format: storage.FormatRaw}})
			}
		}
	}
	return out, nil
}

// rootDiskChain is a QEMU instance's root disk as its VM opens it: a
// layer over the base image the node linked among its disks (and the
// layers under the base, linked there too: layer-<item hash>), or a
// standalone qcow2 put there by a restore. The node wrote the root
// disk's header; one that names anything else is refused.
func rootDiskChain(ctx context.Context, disks string, maxDepth int) (backup.Disk, error) {
	path := filepath.Join(disks, rootDiskFile)
	info, err := storage.Inspect(ctx, storage.Image{Path: path, Format: storage.FormatQCOW2})
	if err != nil {
		return backup.Disk{}, fmt.Errorf("root disk: %w", err)
	}
	d := backup.Disk{Member: "rootfs.qcow2", Image: info.Image}
	if info.BackingFile == "" {
		return d, info.Standalone()
	}
	base := filepath.Join(disks, "base")
	if info.BackingFile != base || info.DataFile || info.Encrypted ||
		(info.BackingFormat != storage.FormatRaw && info.BackingFormat != storage.FormatQCOW2) {
		return backup.Disk{}, fmt.Errorf("root disk %s is not a layer over %s", path, base)
	}
	chain, err := storage.InspectChain(ctx, base, linkedLayers(disks), maxDepth)
	if err != nil {
		return backup.Disk{}, fmt.Errorf("root disk %s: %w", path, err)
	}
	if chain[0].Format != info.BackingFormat {
		return backup.Disk{}, fmt.Errorf("root disk %s names %s as %s, and it is %s", path, base, info.BackingFormat, chain[0].Format)
	}
	for _, img := range storage.Images(chain) {
		d.Backing = append(d.Backing, hypervisor.Layer{Path: img.Path, Format: img.Format})
	}
	return d, nil
}

// linkedLayers resolves the layers under an instance's base to the links
// its start made among its disks, and to nothing else.
func linkedLayers(disks string) storage.Resolver {
	return func(_ context.Context, hash message.ItemHash) (string, error) {
		p := filepath.Join(disks, layerPrefix+string(hash))
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("layer %s is not among the instance's disks: %w", hash, err)
		}
		return p, nil
	}
}

// RootDiskSizeMiB is the root disk size ref's message gives, for a QEMU
// instance.
func (m *Manager) RootDiskSizeMiB(ctx context.Context, ref message.ItemHash) (int64, error) {
	rec, err := m.opts.Records.Get(ctx, ref)
	if err != nil {
		return 0, backup.NotHosted(ref)
	}
	if rec.HypervisorName() != hypervisor.QEMU {
		return 0, backup.RestoreNotQEMU
	}
	msg, _, err := m.opts.Store.Message(ctx, ref)
	if err != nil {
		return 0, execution.StoreError("Message", ref, err)
	}
	c, ok := msg.Content.(*message.InstanceContent)
	if !ok {
		return 0, backup.RestoreNotQEMU
	}
	return c.Rootfs.SizeMiB, nil
}

// ReplaceRootDisk stops QEMU instance ref, puts the qcow2 at path (checked
// by the caller: backup.Validate) in place of its root disk and starts
// it. The disk is moved when move is set (an upload on the same
// filesystem), else copied (a stored item). The swap is two renames in
// the disks' directory; the previous disk stays, as
// rootfs.pre-restore-<time>.qcow2, until the instance's guest agent
// answers from the restored disk, and is put back if the instance
// cannot start from it.
func (m *Manager) ReplaceRootDisk(ctx context.Context, ref message.ItemHash, path string, move bool) (err error) {
	defer m.lock(ref)()
	defer m.logFailure("restore", ref, &err)
	disks := filepath.Join(m.opts.VolumesDir, string(ref))
	root := filepath.Join(disks, rootDiskFile)
	if _, err := os.Stat(root); err != nil {
		return &execution.Error{Status: 400, Msg: "VM has no rootfs", Err: err}
	}
	staging := filepath.Join(disks, restoreStaging)
	_ = os.Remove(staging)
	if err := place(path, staging, move); err != nil {
		return fmt.Errorf("stage the restored disk: %w", err)
	}
	defer os.Remove(staging)
	if _, err := m.stop(ctx, ref); err != nil {
		return err
	}
	prev := filepath.Join(disks, preRestore+time.Now().UTC().Format("20060102T150405Z")+".qcow2")
	if err := os.Rename(root, prev); err != nil {
		return err
	}
	if err := os.Rename(staging, root); err != nil {
		return errors.Join(err, os.Rename(prev, root))
	}
	syncDir(disks)
	log := m.opts.Log.With("ref", ref)
	if err := m.start(ctx, ref, -1); err != nil {
		log.Error("the instance does not start from its restored disk: putting the previous one back", "err", err)
		if rerr := os.Rename(prev, root); rerr != nil {
			return errors.Join(err, rerr)
		}
		syncDir(disks)
		return errors.Join(err, m.start(ctx, ref, -1))
	}
	log.Info("root disk restored", "previous", prev)
	if iv := m.get(ref); iv != nil {
		go m.confirmBoot(iv, prev)
	}
	return nil
}

// place moves (or copies) src to dst, durably.
func place(src, dst string, move bool) error {
	if move {
		if err := os.Rename(src, dst); err == nil {
			return nil
		}
	}
	_, err := storage.CloneFile(src, dst)
	if err == nil && move {
		os.Remove(src)
	}
	return err
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// confirmBoot removes the previous root disk once the guest agent of the
// restored instance answers (its system booted from the restored disk);
// it keeps it if the VM ends or the agent stays silent.
func (m *Manager) confirmBoot(iv *instanceVM, prev string) {
	vm, ok := iv.vm.(backupVM)
	log := m.opts.Log.With("ref", iv.ref)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootConfirmTimeout)
	defer cancel()
	for {
		if ga, err := qemu.DialGuestAgent(ctx, vm.GuestAgentSocket(), 5*time.Second); err == nil {
			ga.Close()
			if err := os.Remove(prev); err != nil {
				log.Warn("remove the disk a restore replaced", "disk", prev, "err", err)
				return
			}
			log.Info("the instance booted from its restored disk: the previous one is removed", "disk", prev)
			return
		}
		select {
		case <-iv.done:
			log.Warn("the instance stopped before it answered from its restored disk: the previous disk is kept", "disk", prev)
			return
		case <-ctx.Done():
			log.Warn("the restored instance's guest agent never answered: the previous disk is kept", "disk", prev)
			return
		case <-time.After(2 * time.Second):
		}
	}
}

// restoredRootDisk finds a root disk a restore put in place: a standalone
// qcow2 (checked when it was restored, and again here), grown to sizeMiB
// if it is smaller. ok is false for any other disk, or none.
func (m *Manager) restoredRootDisk(ctx context.Context, path string, sizeMiB int64) (d hypervisor.Drive, ok bool, err error) {
	if _, err := os.Lstat(path); err != nil {
		return hypervisor.Drive{}, false, nil
	}
	info, err := storage.Inspect(ctx, storage.Image{Path: path, Format: storage.FormatQCOW2})
	if err != nil || info.BackingFile != "" {
		return hypervisor.Drive{}, false, nil // CreateOverlay says what is wrong
	}
	if err := info.Standalone(); err != nil {
		return hypervisor.Drive{}, false, fmt.Errorf("root disk %s: %w", path, err)
	}
	if size := sizeMiB << 20; info.VirtualSize < size {
		if err := m.opts.Disks.Grow(ctx, path, size); err != nil {
			return hypervisor.Drive{}, false, err
		}
	}
	return hypervisor.Drive{Path: path, Format: storage.FormatQCOW2, Serial: "rootfs"}, true, nil
}

// recoverRestore ends a restore a crash cut between its two renames, when
// the instance has no root disk: the restored disk, staged whole, is put
// in place; without it, the previous disk is put back.
func recoverRestore(disks string, log *slog.Logger) error {
	root := filepath.Join(disks, rootDiskFile)
	if _, err := os.Lstat(root); !errors.Is(err, os.ErrNotExist) {
		return nil
	}
	staging := filepath.Join(disks, restoreStaging)
	if _, err := os.Lstat(staging); err == nil {
		log.Warn("finishing a restore cut by a crash: the restored disk takes its place")
		return os.Rename(staging, root)
	}
	prev, _ := filepath.Glob(filepath.Join(disks, preRestore+"*.qcow2"))
	if len(prev) == 0 {
		return nil
	}
	sort.Strings(prev)
	log.Warn("a restore was cut by a crash: the previous root disk is put back", "disk", prev[len(prev)-1])
	return os.Rename(prev[len(prev)-1], root)
}

// settleInterruptedBackup undoes what a node killed during a backup left:
// a VM paused for a crash-consistent copy is resumed, and filesystems
// frozen by the guest agent are thawed. A node pauses and freezes
// instances for nothing else.
func settleInterruptedBackup(vm any, log *slog.Logger) {
	q, ok := vm.(interface{ QMP() *qemu.QMP })
	bv, isBackupVM := vm.(backupVM)
	if !ok || !isBackupVM {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if st, err := q.QMP().Status(ctx); err == nil && st == "paused" {
		log.Warn("resuming an instance a backup left paused")
		if err := bv.Resume(ctx); err != nil {
			log.Error("resume the instance", "err", err)
		}
	}
	ga, err := qemu.DialGuestAgent(ctx, bv.GuestAgentSocket(), 10*time.Second)
	if err != nil {
		return
	}
	defer ga.Close()
	var status string
	if err := ga.Execute(ctx, "guest-fsfreeze-status", 10*time.Second, &status); err == nil && status == "frozen" {
		log.Warn("thawing the filesystems a backup left frozen")
		if _, err := ga.Thaw(ctx, 30*time.Second); err != nil {
			log.Error("thaw the guest's filesystems", "err", err)
		}
	}
}
