package api

import (
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/backup"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

type fakeLayers struct{ asked []message.ItemHash }

func (f *fakeLayers) MakeLayer(_ context.Context, ref message.ItemHash) (LayerAnswer, error) {
	if ref != other {
		return LayerAnswer{}, backup.NotHosted(ref)
	}
	f.asked = append(f.asked, ref)
	if len(f.asked) > 1 {
		return LayerAnswer{}, backup.ErrNotRunning
	}
	return LayerAnswer{Ref: message.ItemHash(strings.Repeat("cd", 32)), Parent: "aleph://" + strings.Repeat("ef", 32), SHA256: "ab", Size: 3, Consistency: "frozen"}, nil
}

// TestLayerRoute checks POST /control/machine/{ref}/layer: its answer,
// credentials, an unknown VM and a refusal.
func TestLayerRoute(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f := &fakeLayers{}
	srv := httptest.NewServer(New(Options{Programs: pool.New(pool.Options{Log: log}), Instances: &fakeInstances{}, Auth: tokenAuth{},
		Layers: f, Version: "test", Log: log}))
	defer srv.Close()
	base := srv.URL + "/control/machine/" + string(other)
	if resp, body := backupCall(t, "POST", base+"/layer", "", "", nil); resp.StatusCode != 401 {
		t.Errorf("without credentials: %d %s", resp.StatusCode, body)
	}
	resp, body := backupCall(t, "POST", base+"/layer", "good", "", nil)
	want := `{"ref":"` + strings.Repeat("cd", 32) + `","parent":"aleph://` + strings.Repeat("ef", 32) + `","sha256":"ab","size":3,"consistency":"frozen"}`
	if resp.StatusCode != 200 || strings.TrimSpace(body) != want || len(f.asked) != 1 || f.asked[0] != other {
		t.Fatalf("layer: %d %s (asked %v)", resp.StatusCode, body, f.asked)
	}
	if resp, body := backupCall(t, "POST", base+"/layer", "good", "", nil); resp.StatusCode != backup.ErrNotRunning.Status {
		t.Errorf("a stopped instance: %d %s", resp.StatusCode, body)
	}
	unknown := srv.URL + "/control/machine/" + strings.Repeat("ab", 32)
	if resp, body := backupCall(t, "POST", unknown+"/layer", "good", "", nil); resp.StatusCode != 404 {
		t.Errorf("unknown VM: %d %q", resp.StatusCode, body)
	}
}
