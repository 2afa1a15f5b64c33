package execution

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

func TestPrepareVolumeRefusals(t *testing.T) {
	for _, tc := range []struct{ volume, want string }{
		{`{"persistence": "store", "name": "a", "mount": "/a", "size_mib": 8}`, "persistence: store"},
		{`{"persistence": "host", "name": "a", "mount": "/a", "size_mib": 8, "parent": {"ref": "7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003", "use_latest": true}}`, "must be an ext4 filesystem or a squashfs"},
	} {
		var vol message.MachineVolume
		if err := json.Unmarshal([]byte(tc.volume), &vol); err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		zeros := filepath.Join(dir, "zeros")
		os.WriteFile(zeros, make([]byte, 4096), 0o644)
		_, err := PrepareVolume(context.Background(), parentStore{path: zeros}, storage.Disks{}, vol, VolumePlace{Path: filepath.Join(dir, "v.ext4")})
		var e *Error
		if !errors.As(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a 400 saying %q", tc.volume, err, tc.want)
		}
	}
}

// parentStore serves one file as every item.
type parentStore struct {
	Store
	path    string
	fetched *int
}

func (s parentStore) Fetch(ctx context.Context, ref message.ItemHash, useLatest bool) (*store.Item, error) {
	if s.fetched != nil {
		*s.fetched++
	}
	return &store.Item{Ref: ref, Path: s.path}, nil
}

func TestParentVolume(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "resize2fs")
	dir := t.TempDir()
	files := filepath.Join(dir, "files")
	os.MkdirAll(files, 0o755)
	os.WriteFile(filepath.Join(files, "hello"), []byte("parent\n"), 0o644)
	parent := filepath.Join(dir, "parent.ext4")
	os.WriteFile(parent, nil, 0o644)
	os.Truncate(parent, 4<<20)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", files, parent).CombinedOutput(); err != nil {
		t.Fatal(err, string(out))
	}
	var vol message.MachineVolume
	json.Unmarshal([]byte(`{"persistence": "host", "name": "a", "mount": "/a", "size_mib": 16, "parent": {"ref": "7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003", "use_latest": false}}`), &vol)
	fetched := 0
	st := parentStore{path: parent, fetched: &fetched}
	place := VolumePlace{Path: filepath.Join(dir, "vm", "a.ext4"), Label: "a"}
	got, err := PrepareVolume(context.Background(), st, storage.Disks{}, vol, place)
	if err != nil || got.Path != place.Path || got.ReadOnly || got.Release != nil {
		t.Fatalf("%+v %v", got, err)
	}
	if out, err := exec.Command("debugfs", "-R", "cat /hello", place.Path).Output(); err != nil || string(out) != "parent\n" {
		t.Errorf("the parent's file: %q %v", out, err)
	}
	// Started again: the volume (what the VM wrote) is kept, the parent
	// not even fetched.
	if _, err := PrepareVolume(context.Background(), st, storage.Disks{}, vol, place); err != nil || fetched != 1 {
		t.Errorf("second start: %v, %d fetches", err, fetched)
	}
	// A volume smaller than its parent is refused, saying so.
	vol.SizeMiB = 2
	_, err = PrepareVolume(context.Background(), st, storage.Disks{}, vol, VolumePlace{Path: filepath.Join(dir, "vm", "b.ext4")})
	var e *Error
	if !errors.As(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), "larger than the volume") {
		t.Errorf("a volume smaller than its parent: %v", err)
	}
}
