package api

import (
	"context"
	"net/http"
)

// FastAPIChecker runs the node's diagnostic program's checks, as the
// reference's /status/check/fastapi does.
type FastAPIChecker interface {
	// CheckFastAPI checks the diagnostic program (the legacy one when
	// legacy), leaving out the checks newer than the reference's legacy
	// runtime when retro; body is the JSON answer.
	CheckFastAPI(ctx context.Context, legacy, retro bool) (body []byte, passed bool)
}

// handleCheckFastAPI serves /status/check/fastapi[?retro-compatibility=true]
// and /status/check/fastapi/legacy: 200 when the required checks pass,
// else 503, with each check's result.
func (s *Server) handleCheckFastAPI(legacy bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Access-Control-Allow-Origin", "*")
		if s.opts.FastAPI == nil {
			writeError(w, http.StatusServiceUnavailable, "this node has no diagnostic program (CHECK_FASTAPI_VM_ID, or a runtime to run its own)")
			return
		}
		retro := legacy || r.URL.Query().Get("retro-compatibility") == "true"
		body, passed := s.opts.FastAPI.CheckFastAPI(r.Context(), legacy, retro)
		status := http.StatusOK
		if !passed {
			status = http.StatusServiceUnavailable
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(status)
		w.Write(body)
	}
}
