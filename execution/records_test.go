package execution

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/internal/teststore"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
)

func TestRecords(t *testing.T) {
	ctx := context.Background()
	database, err := db.Open(ctx, filepath.Join(t.TempDir(), "node.sqlite3"), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer database.Close()
	r := NewRecords(database)
	rec := Record{Ref: "aa", Kind: KindInstance, State: StateRunning, Hypervisor: "qemu", VCPUs: 2, MemoryMiB: 512,
		NetIndex: 7, Tap: "avm7", IPv4Network: "172.16.7.0/24", IPv4: "172.16.7.2", VMDir: "/run/x",
		Forwards: []network.Forward{{Proto: "tcp", HostPort: 24000, GuestPort: 22}}, StartedAt: time.Unix(1700000000, 0)}
	if err := r.Put(ctx, rec); err != nil {
		t.Fatal(err)
	}
	got, err := r.Get(ctx, "aa")
	if err != nil || got.Tap != "avm7" || got.NetIndex != 7 || len(got.Forwards) != 1 || got.Forwards[0].HostPort != 24000 || !got.StartedAt.Equal(rec.StartedAt) {
		t.Fatalf("%+v %v", got, err)
	}
	// A record written again keeps its creation time.
	again := rec
	again.CreatedAt = time.Unix(1800000000, 0)
	if err := r.Put(ctx, again); err != nil {
		t.Fatal(err)
	}
	if got2, _ := r.Get(ctx, "aa"); !got2.CreatedAt.Equal(got.CreatedAt) {
		t.Errorf("created_at %v became %v", got.CreatedAt, got2.CreatedAt)
	}
	// Another VM may not hold network 7 while this one may run...
	clash := rec
	clash.Ref = "bb"
	if err := r.Put(ctx, clash); err == nil {
		t.Error("two running VMs recorded on one network")
	}
	// ...but may once it stopped.
	if err := r.SetState(ctx, "aa", StateStopped); err != nil {
		t.Fatal(err)
	}
	if err := r.Put(ctx, clash); err != nil {
		t.Errorf("network of a stopped VM not reusable: %v", err)
	}
	list, err := r.List(ctx, KindInstance)
	if err != nil || len(list) != 2 || list[0].State != StateStopped || list[0].StoppedAt.IsZero() {
		t.Errorf("%+v %v", list, err)
	}
	if err := r.Delete(ctx, "aa"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get(ctx, "aa"); !errors.Is(err, ErrNoRecord) {
		t.Errorf("after delete: %v", err)
	}
	prog := Record{Ref: "cc", Kind: KindProgram, State: StateRunning, Hypervisor: "qemu", NetIndex: -1}
	if err := r.Put(ctx, prog); err != nil {
		t.Fatal(err)
	}
	if got, _ := r.Get(ctx, "cc"); got.NetIndex != -1 || got.Forwards != nil && len(got.Forwards) != 0 {
		t.Errorf("%+v", got)
	}
}

func TestEachLive(t *testing.T) {
	ctx := context.Background()
	_, db := teststore.Open(t, t.TempDir())
	r := NewRecords(db)
	for ref, state := range map[message.ItemHash]State{"aa": StateRunning, "bb": StateStopped, "cc": StateStarting} {
		if err := r.Put(ctx, Record{Ref: ref, Kind: KindProgram, State: state, NetIndex: -1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Put(ctx, Record{Ref: "dd", Kind: KindInstance, State: StateRunning, NetIndex: -1}); err != nil {
		t.Fatal(err)
	}
	var seen []string
	err := r.EachLive(ctx, KindProgram, func(rec Record) error {
		seen = append(seen, string(rec.Ref))
		if rec.Ref == "cc" {
			return errors.New("gone")
		}
		return nil
	})
	sort.Strings(seen)
	if strings.Join(seen, ",") != "aa,cc" {
		t.Errorf("saw %v", seen)
	}
	if err == nil || err.Error() != "program cc: gone" {
		t.Errorf("error %v", err)
	}
}
