package api

import (
	"context"
	"net/http"

	"github.com/alephvm/alephvm/diskusage"
)

// Storage measures the node's disk space and reclaims what no VM owns
// (diskusage.Walk and diskusage.Reclaim over the node's directories).
type Storage interface {
	Status(ctx context.Context) (diskusage.Report, error)
	Reclaim(ctx context.Context, dryRun bool) (diskusage.Result, error)
}

// handleStorage answers GET /control/storage: the space by kind and what
// is reclaimable, for the operator (the scheduler's credentials).
func (s *Server) handleStorage(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.authed(w, r); !ok {
		return
	}
	if s.opts.Storage == nil {
		writeError(w, http.StatusNotFound, "Not Found")
		return
	}
	rep, err := s.opts.Storage.Status(r.Context())
	if err != nil {
		s.log.Error("measure the node's storage", "err", err)
		writeError(w, http.StatusInternalServerError, "measuring the node's storage failed: "+err.Error())
		return
	}
	if rep.Reclaimable == nil {
		rep.Reclaimable = []diskusage.Item{}
	}
	writeJSON(w, http.StatusOK, rep)
}

// handleStorageReclaim answers POST /control/storage/reclaim: removes
// what no record owns, or only lists it with ?dry_run=true.
func (s *Server) handleStorageReclaim(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.authed(w, r); !ok {
		return
	}
	if s.opts.Storage == nil {
		writeError(w, http.StatusNotFound, "Not Found")
		return
	}
	dry := false
	switch r.URL.Query().Get("dry_run") {
	case "", "false", "0":
	case "true", "1":
		dry = true
	default:
		writeError(w, http.StatusBadRequest, "dry_run must be true or false")
		return
	}
	res, err := s.opts.Storage.Reclaim(r.Context(), dry)
	if err != nil {
		s.log.Error("reclaim the node's storage", "err", err)
		writeError(w, http.StatusInternalServerError, "reclaiming storage failed: "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, res)
}
