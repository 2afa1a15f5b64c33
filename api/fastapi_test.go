package api

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

type fakeFastAPI struct{ legacy, retro bool }

func (f *fakeFastAPI) CheckFastAPI(_ context.Context, legacy, retro bool) ([]byte, bool) {
	f.legacy, f.retro = legacy, retro
	if legacy {
		return []byte(`{"index": false}`), false
	}
	return []byte(`{"index": true}`), true
}

func TestCheckFastAPIRoute(t *testing.T) {
	f := &fakeFastAPI{}
	srv := httptest.NewServer(New(Options{FastAPI: f}))
	defer srv.Close()
	bare := httptest.NewServer(New(Options{}))
	defer bare.Close()
	for _, tc := range []struct {
		url                   string
		status                int
		body                  string
		wantLegacy, wantRetro bool
	}{
		{srv.URL + "/status/check/fastapi", 200, `{"index": true}`, false, false},
		{srv.URL + "/status/check/fastapi?retro-compatibility=true", 200, `{"index": true}`, false, true},
		{srv.URL + "/status/check/fastapi/legacy", 503, `{"index": false}`, true, true},
		{bare.URL + "/status/check/fastapi", 503, "", false, false},
	} {
		*f = fakeFastAPI{}
		resp, err := http.Get(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || (tc.body != "" && string(body) != tc.body) {
			t.Errorf("%s: %d %s, want %d %s", tc.url, resp.StatusCode, body, tc.status, tc.body)
		}
		if resp.Header.Get("Access-Control-Allow-Origin") != "*" || resp.Header.Get("Content-Type") != "application/json; charset=utf-8" {
			t.Errorf("%s: headers %v", tc.url, resp.Header)
		}
		if tc.body != "" && (f.legacy != tc.wantLegacy || f.retro != tc.wantRetro) {
			t.Errorf("%s: legacy %v retro %v", tc.url, f.legacy, f.retro)
		}
	}
}
