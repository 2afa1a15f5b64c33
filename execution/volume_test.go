package execution

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
)

func TestPrepareVolumeRefusals(t *testing.T) {
	for _, tc := range []struct{ volume, want string }{
		{`{"persistence": "store", "name": "a", "mount": "/a", "size_mib": 8}`, "persistence: store"},
		{`{"persistence": "host", "name": "a", "mount": "/a", "size_mib": 8, "parent": {"ref": "7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003", "use_latest": true}}`, "with a parent"},
	} {
		var vol message.MachineVolume
		if err := json.Unmarshal([]byte(tc.volume), &vol); err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		_, err := PrepareVolume(context.Background(), nil, storage.Disks{}, vol, VolumePlace{Path: filepath.Join(dir, "v.ext4")})
		var e *Error
		if !errors.As(err, &e) || e.Status != 400 || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a 400 saying %q", tc.volume, err, tc.want)
		}
	}
}
