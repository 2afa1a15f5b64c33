package execution

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

// VolumePlace says where a VM's writable volume goes: programs and
// instances keep them in places of their own.
type VolumePlace struct {
	// Path is the volume's file: in the VM's runtime directory for an
	// ephemeral volume, with the VM's disks for a persistent one.
	Path string
	// Label is the ext4 label of a volume made here.
	Label string
}

// Volume is a volume of a message made ready for a VM.
type Volume struct {
	Path     string
	ReadOnly bool
	// Release gives back what was taken for the VM: an immutable volume's
	// pin, an ephemeral volume's file. Nil for a persistent volume, which
	// stays.
	Release func()
}

// PrepareVolume makes volume vol of a message ready for a VM: an
// immutable one is fetched from the store (pinned until Release), an
// ephemeral one made fresh at place, a persistent one made at place unless
// it exists. What the node cannot honour is refused with a 400 saying why.
func PrepareVolume(ctx context.Context, st Store, disks storage.Disks, vol message.MachineVolume, place VolumePlace) (Volume, error) {
	switch vol.Kind() {
	case message.VolumeImmutable:
		item, err := st.Fetch(ctx, vol.Ref, vol.UseLatest)
		if err != nil {
			return Volume{}, StoreError("Volume", vol.Ref, err)
		}
		return Volume{Path: item.Path, ReadOnly: true, Release: item.Release}, nil
	case message.VolumeEphemeral:
		_ = os.Remove(place.Path)
		if err := disks.CreateVolume(ctx, place.Path, vol.SizeMiB, place.Label); err != nil {
			return Volume{}, err
		}
		return Volume{Path: place.Path, Release: func() { _ = os.Remove(place.Path) }}, nil
	default:
		if vol.Persistence != nil && *vol.Persistence == message.PersistenceStore {
			// The reference defines no way to keep a volume on the network
			// either: its node treats "store" as "host" (a latent bug), and
			// the schema says nothing of when or where it would be stored.
			return Volume{}, &Error{Status: 400, Msg: "persistent volumes kept on the network (persistence: store) are not supported: the protocol defines no way to store them; use persistence: host"}
		}
		if err := os.MkdirAll(filepath.Dir(place.Path), 0o700); err != nil {
			return Volume{}, fmt.Errorf("volume directory: %w", err)
		}
		if vol.Parent != nil {
			return parentVolume(ctx, st, disks, vol, place)
		}
		if err := disks.CreateVolume(ctx, place.Path, vol.SizeMiB, place.Label); err != nil {
			return Volume{}, err
		}
		return Volume{Path: place.Path}, nil
	}
}

// parentVolume makes a persistent volume that starts as a copy of its
// parent item (ext4 or squashfs), unless it exists: then it holds what
// the VM wrote and is kept.
func parentVolume(ctx context.Context, st Store, disks storage.Disks, vol message.MachineVolume, place VolumePlace) (Volume, error) {
	if _, err := os.Lstat(place.Path); err == nil {
		return Volume{Path: place.Path}, nil
	}
	item, err := st.Fetch(ctx, vol.Parent.Ref, vol.Parent.UseLatest)
	if err != nil {
		return Volume{}, StoreError("Volume parent", vol.Parent.Ref, err)
	}
	defer item.Release()
	err = disks.CreateVolumeFrom(ctx, item.Path, place.Path, vol.SizeMiB, place.Label)
	switch {
	case errors.Is(err, storage.ErrParentFormat), errors.Is(err, storage.ErrParentTooLarge):
		return Volume{}, &Error{Status: 400, Msg: fmt.Sprintf("volume parent %s: %v", vol.Parent.Ref, err)}
	case err != nil:
		return Volume{}, err
	}
	return Volume{Path: place.Path}, nil
}
