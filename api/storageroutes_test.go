package api

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/alephvm/alephvm/diskusage"
)

type fakeStorage struct {
	dry   []bool
	fails bool
}

func (f *fakeStorage) Status(context.Context) (diskusage.Report, error) {
	if f.fails {
		return diskusage.Report{}, errors.New("boom")
	}
	return diskusage.Report{Kinds: []diskusage.Usage{{Kind: diskusage.KindStore, Files: 1, Apparent: 10, Allocated: 8}}, Apparent: 10, Allocated: 8}, nil
}

func (f *fakeStorage) Reclaim(_ context.Context, dry bool) (diskusage.Result, error) {
	f.dry = append(f.dry, dry)
	return diskusage.Result{DryRun: dry, Items: []diskusage.Item{}}, nil
}

func TestStorageRoutes(t *testing.T) {
	fs := &fakeStorage{}
	srv := httptest.NewServer(New(Options{Auth: tokenAuth{}, Storage: fs, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}))
	defer srv.Close()
	get := func(token string) (int, string) {
		req, _ := http.NewRequest("GET", srv.URL+"/control/storage", nil)
		if token != "" {
			req.Header.Set("X-Auth-Signature", token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get(""); code != http.StatusUnauthorized {
		t.Errorf("GET without credentials: %d", code)
	}
	if code, _ := get("stranger"); code != http.StatusForbidden {
		t.Errorf("GET with others' credentials: %d", code)
	}
	code, body := get("good")
	var rep struct {
		Kinds       []map[string]any `json:"kinds"`
		Reclaimable []any            `json:"reclaimable"`
	}
	if code != http.StatusOK || json.Unmarshal([]byte(body), &rep) != nil || len(rep.Kinds) != 1 || rep.Reclaimable == nil {
		t.Errorf("GET: %d %s", code, body)
	}
	for _, tc := range []struct {
		token, query string
		want         int
	}{
		{"", "", http.StatusUnauthorized},
		{"good", "?dry_run=maybe", http.StatusBadRequest},
		{"good", "?dry_run=true", http.StatusOK},
		{"good", "", http.StatusOK},
	} {
		if code, body := post(t, srv.URL+"/control/storage/reclaim"+tc.query, tc.token, ""); code != tc.want {
			t.Errorf("POST reclaim%s (%q): %d %s", tc.query, tc.token, code, body)
		}
	}
	if len(fs.dry) != 2 || !fs.dry[0] || fs.dry[1] {
		t.Errorf("reclaims called with dry run %v, want [true false]", fs.dry)
	}
	fs.fails = true
	if code, _ := get("good"); code != http.StatusInternalServerError {
		t.Errorf("failing walk: %d", code)
	}
}
