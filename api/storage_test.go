package api

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	exec "github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
	"github.com/alephvm/alephvm/store"
)

// storeFailure is a launcher whose items the store refuses with err.
type storeFailure struct{ err error }

func (l storeFailure) Plan(context.Context, message.ItemHash) (*pool.Plan, error) {
	return nil, exec.StoreError("code", ref, l.err)
}

func (l storeFailure) Boot(context.Context, *pool.Plan) (pool.Program, error) {
	panic("booted a program whose items the store refused")
}

func TestStoreRefusalStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int
	}{
		{fmt.Errorf("download x: %w: 1 GiB free", store.ErrInsufficientStorage), http.StatusInsufficientStorage},
		{fmt.Errorf("file x: %w", store.ErrTooLarge), http.StatusBadRequest},
	} {
		log := slog.New(slog.NewTextHandler(io.Discard, nil))
		p := pool.New(pool.Options{Launcher: storeFailure{tc.err}, Capacity: pool.Capacity{MemoryMiB: 1024, VCPUs: 4}, ReuseTimeout: time.Hour, Log: log})
		srv := httptest.NewServer(New(Options{Programs: p, Auth: tokenAuth{}, Domain: "node.example", MaxBodyBytes: 1 << 20, Version: "test", Log: log}))
		resp, body := get(t, srv.URL+"/vm/"+string(ref)+"/", "")
		if resp.StatusCode != tc.want || !strings.Contains(body, string(ref)) {
			t.Errorf("%v: %d %s, want %d", tc.err, resp.StatusCode, body, tc.want)
		}
		srv.Close()
		p.Shutdown(context.Background())
	}
}
