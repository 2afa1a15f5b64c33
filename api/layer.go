package api

import (
	"context"
	"net/http"

	"github.com/alephvm/alephvm/message"
)

// Layers makes a qcow2 layer of a running instance's root disk and stores
// it (instance.Manager.MakeRunningLayer, then the store).
type Layers interface {
	MakeLayer(ctx context.Context, ref message.ItemHash) (LayerAnswer, error)
}

// LayerAnswer is what POST /control/machine/{ref}/layer answers: the
// stored layer's ref, the parent it names (aleph://<item hash>), its
// sha256 and size, and how the copy was held still ("frozen" by the guest
// agent, or "crash" for a paused VM).
type LayerAnswer struct {
	Ref         message.ItemHash `json:"ref"`
	Parent      string           `json:"parent"`
	SHA256      string           `json:"sha256"`
	Size        int64            `json:"size"`
	Consistency string           `json:"consistency"`
}

func (s *Server) routeLayers() {
	if s.opts.Layers == nil {
		return
	}
	s.mux.HandleFunc("POST /control/machine/{ref}/layer", cors(s.handleLayer))
}

// handleLayer makes a layer of a running QEMU instance, for its owner or
// the operator; a stopped one is made by `alephvm image layer` on the
// node's machine without the API.
func (s *Server) handleLayer(w http.ResponseWriter, r *http.Request) {
	ref, m, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	if m.Type == TypeProgram {
		writeText(w, http.StatusBadRequest, "a layer is made of an instance's root disk; "+string(ref)+" is a program")
		return
	}
	a, err := s.opts.Layers.MakeLayer(context.WithoutCancel(r.Context()), ref)
	if err != nil {
		s.writeBackupError(w, ref, "Layer creation failed", err)
		return
	}
	writeJSON(w, http.StatusOK, a)
}
