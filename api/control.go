package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// Instances is the node's instance manager as the API uses it.
type Instances interface {
	Start(ctx context.Context, ref message.ItemHash) error
	Stop(ctx context.Context, ref message.ItemHash) (bool, error)
	Reboot(ctx context.Context, ref message.ItemHash) error
	Erase(ctx context.Context, ref message.ItemHash) error
	// Reinstall gives the instance a fresh root disk (and fresh volumes
	// when eraseVolumes) and starts it.
	Reinstall(ctx context.Context, ref message.ItemHash, eraseVolumes bool) error
	// UpdatePorts applies its owner's port-forwarding aggregate again; it
	// reports whether the instance runs.
	UpdatePorts(ctx context.Context, ref message.ItemHash) (bool, error)
	Running(ref message.ItemHash) bool
	// Run returns the id of the instance's current run, a new one each
	// time it starts, and whether it runs.
	Run(ref message.ItemHash) (uint64, bool)
	// StopRun stops the instance if its current run is still run: a timer
	// set for one run never stops a later one.
	StopRun(ctx context.Context, ref message.ItemHash, run uint64) (bool, error)
	Allocate(ctx context.Context, desired []message.ItemHash) AllocationResult
	Statuses(ctx context.Context) ([]InstanceStatus, error)
}

// AllocationResult is the answer to an allocation, in the reference's
// shape.
type AllocationResult struct {
	Success    bool              `json:"success"`
	Successful []string          `json:"successful"`
	Failing    []string          `json:"failing"`
	Stopped    []string          `json:"stopped"`
	Errors     map[string]string `json:"errors"`
}

// InstanceStatus describes one instance for the executions lists.
type InstanceStatus struct {
	Ref         message.ItemHash
	Running     bool
	StartedAt   time.Time
	VCPUs       int
	MemoryMiB   int
	IPv4Network string
	HostIPv4    string
	IPv4        string
	IPv6Network string // empty without IPv6
	IPv6        string
	// MappedPorts maps a guest port to its host port per protocol.
	MappedPorts map[string]MappedPort
}

// MappedPort is the reference's mapped_ports entry.
type MappedPort struct {
	Host int  `json:"host"`
	TCP  bool `json:"tcp"`
	UDP  bool `json:"udp"`
}

// Authenticator checks the scheduler's credentials and returns the body it
// verified.
type Authenticator interface {
	Verify(r *http.Request) ([]byte, error)
}

// authed reads the verified body of a scheduler call, or answers the
// failure; ok is false then.
func (s *Server) authed(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	if s.opts.Auth == nil {
		writeError(w, http.StatusForbidden, "This node accepts no scheduler calls: no allocation token or signer is configured")
		return nil, false
	}
	limitBody(w, r, auth.MaxBodyBytes)
	body, err := s.opts.Auth.Verify(r)
	if err != nil {
		status := http.StatusUnauthorized
		var se StatusError
		if errors.As(err, &se) {
			status = se.HTTPStatus()
		}
		if status == http.StatusRequestEntityTooLarge {
			refuseBody(w, r)
		}
		writeError(w, status, err.Error())
		return nil, false
	}
	return body, true
}

type allocation struct {
	PersistentVMs []message.ItemHash `json:"persistent_vms"`
	Instances     []message.ItemHash `json:"instances"`
	OnDemandVMs   []message.ItemHash `json:"on_demand_vms"`
	Jobs          []message.ItemHash `json:"jobs"`
}

// handleAllocations applies the scheduler's desired set of VMs.
func (s *Server) handleAllocations(w http.ResponseWriter, r *http.Request) {
	body, ok := s.authed(w, r)
	if !ok {
		return
	}
	var a allocation
	if err := json.Unmarshal(body, &a); err != nil {
		writeError(w, http.StatusBadRequest, "Invalid allocation: "+err.Error())
		return
	}
	if len(a.OnDemandVMs) > 0 || len(a.Jobs) > 0 {
		s.log.Warn("allocation lists on-demand VMs or jobs, which are not supported", "on_demand_vms", len(a.OnDemandVMs), "jobs", len(a.Jobs))
	}
	desired := append(append([]message.ItemHash{}, a.PersistentVMs...), a.Instances...)
	for _, ref := range desired {
		if _, ok := parseRef(string(ref)); !ok {
			writeError(w, http.StatusBadRequest, "Invalid message reference "+string(ref))
			return
		}
	}
	// The scheduler may hang up; the allocation is carried out anyway.
	ctx := context.WithoutCancel(r.Context())
	res := s.opts.Instances.Allocate(ctx, a.Instances)
	// Persistent programs are kept by the pool, which boots them in the
	// background and again whenever their VM ends.
	refused := false
	if res.Errors == nil {
		res.Errors = map[string]string{}
	}
	errs := s.opts.Programs.SetPersistent(ctx, a.PersistentVMs)
	for _, ref := range a.PersistentVMs {
		err, failed := errs[ref]
		if !failed {
			res.Successful = append(res.Successful, string(ref))
			continue
		}
		res.Failing = append(res.Failing, string(ref))
		res.Errors[string(ref)] = err.Error()
		var se StatusError
		refused = refused || errors.Is(err, pool.ErrNotPersistent) || (errors.As(err, &se) && se.HTTPStatus() == http.StatusBadRequest)
	}
	res.Success = len(res.Failing) == 0
	status := allocationStatus(res, len(desired))
	if refused {
		status = http.StatusBadRequest
	}
	writeJSON(w, status, res)
}

func allocationStatus(res AllocationResult, desired int) int {
	switch {
	case len(res.Failing) == 0:
		return http.StatusOK
	case len(res.Failing) == desired:
		return http.StatusServiceUnavailable
	}
	return http.StatusMultiStatus
}

// handleNotify starts one instance on its owner's request.
func (s *Server) handleNotify(w http.ResponseWriter, r *http.Request) {
	body, ok := s.authed(w, r)
	if !ok {
		return
	}
	var n struct {
		Instance message.ItemHash `json:"instance"`
	}
	if err := json.Unmarshal(body, &n); err != nil {
		writeError(w, http.StatusBadRequest, "Invalid notification: "+err.Error())
		return
	}
	if _, ok := parseRef(string(n.Instance)); !ok {
		writeError(w, http.StatusBadRequest, "Invalid message reference")
		return
	}
	res := AllocationResult{Success: true, Successful: []string{}, Failing: []string{}, Stopped: []string{}, Errors: map[string]string{}}
	status := http.StatusOK
	if err := s.opts.Instances.Start(context.WithoutCancel(r.Context()), n.Instance); err != nil {
		res.Success = false
		res.Failing = append(res.Failing, string(n.Instance))
		res.Errors[string(n.Instance)] = err.Error()
		status = http.StatusServiceUnavailable
		var se StatusError
		if errors.As(err, &se) {
			status = se.HTTPStatus()
		}
	} else {
		res.Successful = append(res.Successful, string(n.Instance))
	}
	writeJSON(w, status, res)
}

// handleStop stops a program or an instance; an instance's disks stay.
func (s *Server) handleStop(w http.ResponseWriter, r *http.Request) {
	ref, m, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	ctx := context.WithoutCancel(r.Context())
	if s.isInstance(m) && s.opts.Instances.Running(ref) {
		if _, err := s.opts.Instances.Stop(ctx, ref); err != nil {
			s.writeOpError(w, err)
			return
		}
		writeText(w, http.StatusOK, "Stopped VM with ref "+string(ref))
		return
	}
	if s.opts.Programs.Stop(ref) {
		writeText(w, http.StatusOK, "Stopped VM with ref "+string(ref))
		return
	}
	writeText(w, http.StatusOK, "Already stopped, nothing to do")
}

func (s *Server) handleReboot(w http.ResponseWriter, r *http.Request) {
	ref, m, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	ctx := context.WithoutCancel(r.Context())
	if s.isInstance(m) {
		if err := s.opts.Instances.Reboot(ctx, ref); err != nil {
			s.writeOpError(w, err)
			return
		}
	} else if !s.restartProgram(ctx, w, ref, false) {
		return
	}
	writeText(w, http.StatusOK, "Rebooted VM with ref "+string(ref))
}

func (s *Server) handleErase(w http.ResponseWriter, r *http.Request) {
	ref, m, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	ctx := context.WithoutCancel(r.Context())
	if s.isInstance(m) {
		s.opts.Programs.Stop(ref)
		if err := s.opts.Instances.Erase(ctx, ref); err != nil {
			s.writeOpError(w, err)
			return
		}
	} else if err := s.eraseProgram(ctx, ref); err != nil {
		s.writeOpError(w, err)
		return
	}
	writeText(w, http.StatusOK, "Erased VM with ref "+string(ref))
}

// handleStart starts a VM: the owner route the Aleph SDKs lack (they call
// the payment-checked /control/allocation/notify); an owner may start only
// a VM this node hosts or hosted.
func (s *Server) handleStart(w http.ResponseWriter, r *http.Request) {
	ref, m, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	ctx := context.WithoutCancel(r.Context())
	if s.isInstance(m) {
		if err := s.opts.Instances.Start(ctx, ref); err != nil {
			s.writeOpError(w, err)
			return
		}
	} else if err := s.bootProgram(ctx, ref); err != nil {
		s.writeStartError(w, ref, err)
		return
	}
	writeText(w, http.StatusOK, "Started VM with ref "+string(ref))
}

// MaxExpireTimeout bounds the timeout of an expiry.
const MaxExpireTimeout = 30 * 24 * time.Hour

// expiries holds the pending expiry of each VM.
type expiries struct {
	mu     sync.Mutex
	timers map[message.ItemHash]*time.Timer
}

// set replaces ref's pending expiry by fn after d.
func (e *expiries) set(ref message.ItemHash, d time.Duration, fn func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if old := e.timers[ref]; old != nil {
		old.Stop()
	}
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		e.mu.Lock()
		if e.timers[ref] == t {
			delete(e.timers, ref)
		}
		e.mu.Unlock()
		fn()
	})
	e.timers[ref] = t
}

// handleExpire stops a VM after a timeout in seconds, given as the JSON
// body {"timeout": 60} (signed calls carry no query string) or as
// ?timeout=60; without one it stops it now. The timeout is at most
// MaxExpireTimeout; a later expiry of the VM replaces it, and it ends with
// the run it was set on (a stop, a reboot, a program's new boot). The
// reference's handler reads a parameter its route does not define and
// always answers 400.
func (s *Server) handleExpire(w http.ResponseWriter, r *http.Request) {
	ref, m, body, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	var req struct {
		Timeout *float64 `json:"timeout"`
	}
	if len(body) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			writeError(w, http.StatusBadRequest, "Invalid timeout duration")
			return
		}
	}
	if t := r.URL.Query().Get("timeout"); t != "" && req.Timeout == nil {
		v, err := strconv.ParseFloat(t, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, "Invalid timeout duration")
			return
		}
		req.Timeout = &v
	}
	timeout := 0.0
	if req.Timeout != nil {
		timeout = *req.Timeout
	}
	// Written so that NaN fails too.
	if !(timeout >= 0 && timeout <= MaxExpireTimeout.Seconds()) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("Invalid timeout duration: must be between 0 and %.0f seconds", MaxExpireTimeout.Seconds()))
		return
	}
	var stop func() (bool, error)
	running := false
	if s.isInstance(m) {
		var run uint64
		run, running = s.opts.Instances.Run(ref)
		stop = func() (bool, error) { return s.opts.Instances.StopRun(context.Background(), ref, run) }
	} else if since, ok := s.programRun(ref); ok {
		running = true
		stop = func() (bool, error) {
			// A program booted again since is another run.
			if now, ok := s.programRun(ref); !ok || !now.Equal(since) {
				return false, nil
			}
			return s.opts.Programs.Stop(ref), nil
		}
	}
	if !running {
		writeText(w, http.StatusOK, "Already stopped, nothing to do")
		return
	}
	s.expiries.set(ref, time.Duration(timeout*float64(time.Second)), func() {
		stopped, err := stop()
		switch {
		case err != nil:
			s.log.Error("expire VM", "ref", ref, "err", err)
		case stopped:
			s.log.Info("VM expired", "ref", ref)
		}
	})
	writeText(w, http.StatusOK, "Expiring VM with ref "+string(ref)+" in "+strconv.FormatFloat(timeout, 'f', -1, 64)+" seconds")
}

// programRun says when the running program ref was booted, which tells
// one run of it from the next.
func (s *Server) programRun(ref message.ItemHash) (time.Time, bool) {
	for _, e := range s.opts.Programs.List() {
		if e.Ref == ref && e.Running {
			return e.Since, true
		}
	}
	return time.Time{}, false
}

func writeText(w http.ResponseWriter, status int, text string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(text))
}

func (s *Server) writeOpError(w http.ResponseWriter, err error) {
	var se StatusError
	if errors.As(err, &se) {
		writeError(w, se.HTTPStatus(), se.Error())
		return
	}
	writeError(w, http.StatusInternalServerError, err.Error())
}
