package instance

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/store"
)

// noStore knows no message.
type noStore struct{}

func (noStore) Message(context.Context, message.ItemHash) (*message.Message, []byte, error) {
	return nil, nil, store.ErrNotFound
}

func (noStore) Fetch(context.Context, message.ItemHash, bool) (*store.Item, error) {
	return nil, store.ErrNotFound
}

func (noStore) Resolve(context.Context, message.ItemHash, bool) (*message.Message, error) {
	return nil, store.ErrNotFound
}

// A failed start, whether asked alone, by an allocation or by a reboot,
// is in the node's log with its reason, not only in the caller's answer.
func TestFailuresAreLogged(t *testing.T) {
	var logged bytes.Buffer
	m := New(Options{Store: noStore{}, Log: slog.New(slog.NewTextHandler(&logged, nil))})
	ref := message.ItemHash(strings.Repeat("ab", 32))
	ctx := context.Background()
	if err := m.Start(ctx, ref); err == nil {
		t.Fatal("started an instance of no message")
	}
	res := m.Allocate(ctx, []message.ItemHash{ref})
	if res.Success {
		t.Fatalf("allocation: %+v", res)
	}
	if err := m.Reboot(ctx, ref); err == nil {
		t.Fatal("rebooted an instance of no message")
	}
	out := logged.String()
	for _, want := range []string{"instance start failed", "instance reboot failed", "ref=" + string(ref), "not found"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "instance start failed"); n != 2 {
		t.Errorf("%d start failures logged, want 2 (alone and in the allocation):\n%s", n, out)
	}
	// Stopping an instance that does not run is no failure.
	logged.Reset()
	if _, err := m.Stop(ctx, ref); err != nil || logged.Len() != 0 {
		t.Errorf("stop of a stopped instance: %v, logged %q", err, logged.String())
	}
}
