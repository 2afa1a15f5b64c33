package api

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"

	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/message"
)

// The operator routes under /control/machine/{ref}/ answer two kinds of
// caller: the node's operator and the scheduler (Auth: the allocation
// token or an Aleph-EIP191-V1 signer), who may act on every VM, and a
// VM's owner, authenticated by the Aleph SDKs' scheme (OwnerAuth), who may
// act on the VMs whose message names their address, or on those of an
// owner whose security aggregate grants it to them (Grants).

// Message types of the VMs, as security aggregates name them.
const (
	TypeInstance = "INSTANCE"
	TypeProgram  = "PROGRAM"
)

// Machine is what the operator routes know of a VM the node hosts.
type Machine struct {
	// Owner is the address its message's content names.
	Owner string
	// Type is TypeInstance or TypeProgram.
	Type string
}

// ErrUnknownMachine is returned for a VM this node has never hosted.
var ErrUnknownMachine = errors.New("no such virtual machine on this node")

// Machines tells which VMs the node hosts (or hosted) and who owns them.
type Machines interface {
	Machine(ctx context.Context, ref message.ItemHash) (Machine, error)
}

// OwnerAuthenticator verifies the owner scheme (auth.Owner).
type OwnerAuthenticator interface {
	Verify(r *http.Request) (auth.Identity, error)
	VerifyCredentials(ctx context.Context, c auth.Credentials, method, path string) (auth.Identity, error)
}

// Grants tells whether an owner's security aggregate lets address act on
// the owner's VMs of a message type (aggregate.Client).
type Grants interface {
	Grants(ctx context.Context, owner, address, messageType string) (bool, error)
}

// VolumeEraser deletes a program's persistent volumes (program.Launcher).
type VolumeEraser interface {
	EraseVolumes(ref message.ItemHash) error
}

// maxOwnerBody bounds the body of an owner's call (expire's timeout).
const maxOwnerBody = 64 << 10

// machineCall authenticates a call of an operator route, reads its {ref}
// and its body and finds the VM. Owner calls answer as the reference: 400
// or 401 for bad credentials, then 400 for a bad ref, 404 for a VM the
// node does not host, 403 "Unauthorized sender" for a wallet that may not
// act on it. ok is false when the answer was written.
func (s *Server) machineCall(w http.ResponseWriter, r *http.Request) (ref message.ItemHash, m Machine, body []byte, ok bool) {
	if !auth.HasCredentials(r) {
		if body, ok = s.authed(w, r); !ok {
			return "", Machine{}, nil, false
		}
		if ref, ok = parseRef(r.PathValue("ref")); !ok {
			writeError(w, http.StatusBadRequest, "Invalid message reference")
			return "", Machine{}, nil, false
		}
		// The operator may name a VM the node does not host yet (start).
		m, _ = s.machine(r.Context(), ref)
		return ref, m, body, true
	}
	if s.opts.OwnerAuth == nil {
		writeError(w, http.StatusForbidden, "This node accepts no owner calls")
		return "", Machine{}, nil, false
	}
	id, err := s.opts.OwnerAuth.Verify(r)
	if err != nil {
		writeAuthError(w, err)
		return "", Machine{}, nil, false
	}
	if ref, ok = parseRef(r.PathValue("ref")); !ok {
		writeError(w, http.StatusBadRequest, "Invalid message reference")
		return "", Machine{}, nil, false
	}
	if m, ok = s.authorize(w, r, ref, id); !ok {
		return "", Machine{}, nil, false
	}
	limitBody(w, r, maxOwnerBody)
	body, err = io.ReadAll(r.Body)
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "Request body too large")
		return "", Machine{}, nil, false
	case err != nil:
		writeError(w, http.StatusBadRequest, "Could not read the request body: "+err.Error())
		return "", Machine{}, nil, false
	}
	return ref, m, body, true
}

// authorize finds VM ref and checks that id may act on it, or answers 404
// or 403.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, ref message.ItemHash, id auth.Identity) (Machine, bool) {
	m, err := s.machine(r.Context(), ref)
	if errors.Is(err, ErrUnknownMachine) {
		writeError(w, http.StatusNotFound, "No virtual machine with ref "+string(ref))
		return Machine{}, false
	}
	if err != nil {
		s.writeOpError(w, err)
		return Machine{}, false
	}
	if !s.mayAct(r.Context(), id, ref, m) {
		writeText(w, http.StatusForbidden, "Unauthorized sender")
		return Machine{}, false
	}
	return m, true
}

func (s *Server) machine(ctx context.Context, ref message.ItemHash) (Machine, error) {
	if s.opts.Machines == nil {
		return Machine{}, ErrUnknownMachine
	}
	return s.opts.Machines.Machine(ctx, ref)
}

// mayAct reports whether id owns the VM, is an operator of the node, or is
// granted the VM's type by the owner's security aggregate.
func (s *Server) mayAct(ctx context.Context, id auth.Identity, ref message.ItemHash, m Machine) bool {
	if m.Owner != "" && id.Is(m.Owner) {
		return true
	}
	for _, op := range s.opts.Operators {
		if id.Is(op) {
			return true
		}
	}
	if s.opts.Grants == nil || m.Owner == "" {
		return false
	}
	ok, err := s.opts.Grants.Grants(ctx, m.Owner, id.Address, m.Type)
	if err != nil {
		s.log.Warn("security aggregate unreadable: only the owner may act", "ref", ref, "owner", m.Owner, "err", err)
	}
	return ok
}

func writeAuthError(w http.ResponseWriter, err error) {
	status := http.StatusUnauthorized
	var se StatusError
	if errors.As(err, &se) {
		status = se.HTTPStatus()
	}
	writeError(w, status, err.Error())
}

// isInstance tells whether the operator routes treat ref as an instance: a
// VM the node hosts is what its message says; one it does not host is an
// instance on a node that runs them.
func (s *Server) isInstance(m Machine) bool {
	if s.opts.Instances == nil {
		return false
	}
	return m.Type != TypeProgram
}

// bootProgram boots program ref, which then stays warm for the reuse
// timeout.
func (s *Server) bootProgram(ctx context.Context, ref message.ItemHash) error {
	lease, err := s.opts.Programs.Acquire(ctx, ref)
	if err != nil {
		return err
	}
	lease.Release()
	return nil
}

// eraseProgram stops a program and deletes its persistent volumes.
func (s *Server) eraseProgram(ctx context.Context, ref message.ItemHash) error {
	if _, err := s.opts.Programs.StopWait(ctx, ref); err != nil {
		return err
	}
	if s.opts.ProgramVolumes == nil {
		return nil
	}
	return s.opts.ProgramVolumes.EraseVolumes(ref)
}

// handleReinstall puts a VM back in its first state and starts it: an
// instance gets a fresh root disk, and both lose their writable volumes
// unless erase_volumes=false (in the query, as the SDKs send it, or in
// the body of a signed scheduler call, which takes no query string).
func (s *Server) handleReinstall(w http.ResponseWriter, r *http.Request) {
	ref, m, body, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	eraseVolumes := r.URL.Query().Get("erase_volumes") != "false"
	if len(body) > 0 {
		var req struct {
			EraseVolumes *bool `json:"erase_volumes"`
		}
		if err := json.Unmarshal(body, &req); err != nil {
			writeError(w, http.StatusBadRequest, "Invalid body: "+err.Error())
			return
		}
		if req.EraseVolumes != nil {
			eraseVolumes = *req.EraseVolumes
		}
	}
	ctx := context.WithoutCancel(r.Context())
	if s.isInstance(m) {
		if err := s.opts.Instances.Reinstall(ctx, ref, eraseVolumes); err != nil {
			s.writeOpError(w, err)
			return
		}
	} else if !s.restartProgram(ctx, w, ref, eraseVolumes) {
		return
	}
	writeText(w, http.StatusOK, "Reinstalled VM with ref "+string(ref))
}

// restartProgram stops program ref, waiting until its VM is gone, erases
// its volumes if asked, and boots it again; it answers the failure and
// returns false.
func (s *Server) restartProgram(ctx context.Context, w http.ResponseWriter, ref message.ItemHash, eraseVolumes bool) bool {
	// A persistent program stays one across its restart.
	if s.opts.Programs.Kept(ref) {
		defer s.opts.Programs.Keep(ref)
	}
	if _, err := s.opts.Programs.StopWait(ctx, ref); err != nil {
		s.writeOpError(w, err)
		return false
	}
	if eraseVolumes && s.opts.ProgramVolumes != nil {
		if err := s.opts.ProgramVolumes.EraseVolumes(ref); err != nil {
			s.writeOpError(w, err)
			return false
		}
	}
	if err := s.bootProgram(ctx, ref); err != nil {
		s.writeStartError(w, ref, err)
		return false
	}
	return true
}

// handleUpdate reads the owner's port-forwarding aggregate again and
// applies it. It takes no credentials, as in the reference and the SDKs,
// which call it after changing the aggregate: it only makes the node
// read what the owner published. The instance manager serializes the
// calls of one VM.
func (s *Server) handleUpdate(w http.ResponseWriter, r *http.Request) {
	ref, ok := parseRef(r.PathValue("ref"))
	if !ok {
		writeError(w, http.StatusBadRequest, "Invalid message reference")
		return
	}
	m, err := s.machine(r.Context(), ref)
	if err != nil {
		writeError(w, http.StatusNotFound, "VM not found")
		return
	}
	if !s.isInstance(m) {
		writeJSON(w, http.StatusOK, struct{}{})
		return
	}
	running, err := s.opts.Instances.UpdatePorts(context.WithoutCancel(r.Context()), ref)
	if err != nil {
		s.writeOpError(w, err)
		return
	}
	if !running {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok", "msg": "VM not starting yet"})
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}
