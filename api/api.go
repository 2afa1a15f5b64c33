// Package api serves the node's HTTP API with the reference's routes and
// shapes: program requests under /vm/{ref}/ (and on <base32 hash>.<domain>),
// reverse-proxied to the program's VM, and the /about and /control routes.
package api

import (
	"context"
	"encoding/base32"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// Programs is the pool of program VMs as the API uses it.
type Programs interface {
	Acquire(ctx context.Context, ref message.ItemHash) (*pool.Lease, error)
	Stop(ref message.ItemHash) bool
	// StopWait stops a program and waits until its VM is gone.
	StopWait(ctx context.Context, ref message.ItemHash) (bool, error)
	List() []pool.ExecutionInfo
	// SetPersistent makes refs the persistent programs the node runs (the
	// allocation's persistent_vms), and says why it refuses some.
	SetPersistent(ctx context.Context, refs []message.ItemHash) map[message.ItemHash]error
	// Kept reports whether ref is kept as a persistent program; Keep
	// keeps it again after a restart on request (Stop and StopWait stop
	// keeping it).
	Kept(ref message.ItemHash) bool
	Keep(ref message.ItemHash)
}

// Options configure the API.
type Options struct {
	Programs Programs
	// Instances runs the node's instances; nil for a node that runs
	// programs only.
	Instances Instances
	// Auth checks the scheduler's and operator's calls.
	Auth Authenticator
	// OwnerAuth checks VM owners' calls (the Aleph SDKs' scheme); nil
	// refuses them.
	OwnerAuth OwnerAuthenticator
	// Machines says which VMs the node hosts and who owns them; nil
	// answers 404 to every owner.
	Machines Machines
	// Grants reads owners' security aggregates; nil grants nothing.
	Grants Grants
	// Operators are wallet addresses that may act on every VM through the
	// owner scheme.
	Operators []string
	// ProgramVolumes erases programs' persistent volumes.
	ProgramVolumes VolumeEraser
	// Domain is the node's public name: GET / on it serves the index, and
	// <base32 of a hash>.<Domain> serves that program.
	Domain string
	// Logs gives VMs' output; nil answers 404 on the logs routes.
	Logs Logs
	// MaxBodyBytes bounds a request body proxied to a program.
	MaxBodyBytes int64
	// Limits bound the HTTP server (HTTPServer, Listener).
	Limits Limits
	// WebsocketOrigins are the host patterns (path.Match, as
	// coder/websocket matches them; with "://", scheme://host) of the web
	// pages that may open a logs websocket. Clients that send no Origin
	// (the CLIs and SDKs) and pages of the node's own host always may.
	WebsocketOrigins []string
	// MaxLogFollowers and MaxLogFollowersPerVM bound the logs websockets
	// open at once, in all and for one VM; 0 means the defaults.
	MaxLogFollowers, MaxLogFollowersPerVM int
	// Observer is told of program requests and allocation calls, for the
	// node's metrics; nil tells nobody.
	Observer Observer
	// Backups makes, serves and restores instances' backups
	// (/control/machine/{ref}/backup, /restore); nil answers 404.
	Backups Backups
	// Layers makes layers of running instances
	// (/control/machine/{ref}/layer); nil answers 404.
	Layers Layers
	// Storage measures and reclaims the node's disk space
	// (/control/storage); nil answers 404.
	Storage Storage
	// Metrics serves /metrics on the node's own names; nil answers 404.
	Metrics http.Handler
	// Status and Checks feed the status page at / (statuspage.go); nil
	// leaves their parts out, saying so.
	Status StatusSource
	Checks SelfChecks
	// FastAPI runs the diagnostic program's checks; nil answers 503.
	FastAPI FastAPIChecker
	// NodeInfo feeds /about/usage/system, /about/capability and
	// /status/config; nil answers 503.
	NodeInfo NodeInfo
	// HostCheck runs /status/check/host and /status/check/ipv6; nil
	// answers 503.
	HostCheck HostChecker
	// LoginToken opens the /about pages (/about/login?token=); empty
	// keeps them closed.
	LoginToken string
	// Settings gives /about/config: every setting by name, secrets
	// redacted.
	Settings func() map[string]string
	// Records gives /about/executions/records; nil lists none.
	Records ExecutionRecords
	// Now is the clock of the usage's period; nil means time.Now.
	Now     func() time.Time
	Version string
	Log     *slog.Logger
}

// Server is the HTTP API.
type Server struct {
	opts      Options
	mux       *http.ServeMux
	proxy     *proxy
	log       *slog.Logger
	followers *followers
	expiries  *expiries
	page      *statusPage
}

// New builds the API.
func New(opts Options) *Server {
	s := &Server{opts: opts, mux: http.NewServeMux(), log: opts.Log, proxy: newProxy(opts.Log),
		followers: newFollowers(opts.MaxLogFollowers, opts.MaxLogFollowersPerVM), expiries: &expiries{timers: map[message.ItemHash]*time.Timer{}}, page: newStatusPage()}
	if u, ok := opts.Programs.(unresponsivePrograms); ok {
		s.proxy.conns.unresponsive = u.Unresponsive
	}
	s.mux.HandleFunc("/vm/{ref}", s.handleProgram)
	s.mux.HandleFunc("/vm/{ref}/{path...}", s.handleProgram)
	s.mux.HandleFunc("GET /about/executions/list", s.handleExecutionsList)
	s.mux.HandleFunc("GET /v2/about/executions/list", s.handleExecutionsListV2)
	s.mux.HandleFunc("POST /control/machine/{ref}/stop", s.handleStop)
	s.mux.HandleFunc("POST /control/machine/{ref}/start", s.handleStart)
	s.mux.HandleFunc("POST /control/machine/{ref}/reboot", s.handleReboot)
	s.mux.HandleFunc("POST /control/machine/{ref}/erase", s.handleErase)
	s.mux.HandleFunc("POST /control/machine/{ref}/expire", s.handleExpire)
	s.mux.HandleFunc("POST /control/machine/{ref}/reinstall", s.handleReinstall)
	s.mux.HandleFunc("POST /control/machine/{ref}/update", s.handleUpdate)
	// aleph-sdk-python's CrnService.update_instance_config posts here.
	s.mux.HandleFunc("POST /control/{ref}/update", s.handleUpdate)
	s.mux.HandleFunc("GET /control/machine/{ref}/logs", s.handleLogs)
	s.mux.HandleFunc("GET /control/machine/{ref}/stream_logs", s.handleStreamLogs)
	s.mux.HandleFunc("GET /status/check/fastapi", s.handleCheckFastAPI(false))
	s.mux.HandleFunc("GET /status/check/fastapi/legacy", s.handleCheckFastAPI(true))
	s.mux.HandleFunc("GET /about/login", cors(s.handleLogin))
	s.mux.HandleFunc("GET /about/config", cors(s.handleAboutConfig))
	s.mux.HandleFunc("GET /about/executions/details", cors(s.handleExecutionDetails))
	for path, h := range map[string]http.HandlerFunc{
		"/about/usage/system": s.handleUsageSystem, "/about/capability": s.handleCapability,
		"/status/config": s.handleStatusConfig, "/status/check/version": s.handleCheckVersion,
		"/status/check/host": s.handleCheckHost, "/status/check/ipv6": s.handleCheckIPv6,
		"/about/executions/records": s.handleExecutionRecords,
	} {
		s.mux.HandleFunc("GET "+path, cors(h))
		s.mux.HandleFunc("OPTIONS "+path, cors(h))
	}
	s.routeBackups()
	s.routeLayers()
	s.mux.HandleFunc("GET /control/storage", s.handleStorage)
	s.mux.HandleFunc("POST /control/storage/reclaim", s.handleStorageReclaim)
	if opts.Instances != nil {
		s.mux.HandleFunc("POST /control/allocations", s.observeAllocation("allocations", s.handleAllocations))
		s.mux.HandleFunc("POST /control/allocation/notify", s.observeAllocation("allocation_notify", s.handleNotify))
	}
	for _, prefix := range []string{"/about/", "/control/", "/status/", "/v2/"} {
		s.mux.HandleFunc(prefix, func(w http.ResponseWriter, r *http.Request) {
			writeError(w, http.StatusNotFound, "Not Found")
		})
	}
	s.mux.HandleFunc("/", s.handleHost)
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Server", "aleph-vm/"+s.opts.Version) // as the reference: monitors read the version here
	d := &deadlineWriter{ResponseWriter: w, conn: clientConnOf(r), timeout: s.opts.Limits.WriteTimeout}
	if d.conn != nil {
		d.conn.stream(false, 0) // until the route streams
	}
	s.mux.ServeHTTP(d, r)
	d.finish()
}

// apiError is the reference's error shape.
type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, apiError{Error: msg})
}

// StatusError is implemented by errors that know the HTTP status they
// deserve, such as a missing item (404).
type StatusError interface {
	error
	HTTPStatus() int
}

func parseRef(s string) (message.ItemHash, bool) {
	h, err := message.ParseItemHash(s)
	return h, err == nil
}

func (s *Server) handleProgram(w http.ResponseWriter, r *http.Request) {
	s.observeProgram(w, r, func(w http.ResponseWriter) {
		ref, ok := parseRef(r.PathValue("ref"))
		if !ok {
			writeError(w, http.StatusBadRequest, "Invalid message reference")
			return
		}
		suffix := strings.TrimPrefix(r.URL.EscapedPath(), "/vm/"+string(ref))
		s.serveProgram(w, r, ref, suffix)
	})
}

// handleHost serves the index on the node's own name, and a program on a
// name whose first label is the base32 of its hash.
func (s *Server) handleHost(w http.ResponseWriter, r *http.Request) {
	if s.nodeHost(r.Host) {
		// The node's own pages are served on its own names only: on a
		// program's name, every path is the program's.
		switch {
		case r.Method != http.MethodGet && r.Method != http.MethodHead:
		case r.URL.Path == "/":
			s.handleStatusPage(w, r)
			return
		case r.URL.Path == "/metrics" && s.opts.Metrics != nil:
			s.opts.Metrics.ServeHTTP(w, r)
			return
		}
		writeError(w, http.StatusNotFound, "Not Found")
		return
	}
	s.observeProgram(w, r, func(w http.ResponseWriter) {
		ref, ok := s.programOfHost(r.Host)
		if !ok {
			writeError(w, http.StatusNotFound, "Invalid message reference")
			return
		}
		s.serveProgram(w, r, ref, r.URL.EscapedPath())
	})
}

// hostName is a Host header's name, without its port.
func hostName(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		return h
	}
	return host
}

// nodeHost tells the node's own names: its domain and its addresses.
func (s *Server) nodeHost(host string) bool {
	host = hostName(host)
	return host == s.opts.Domain || net.ParseIP(host) != nil
}

// programOfHost is the program served on a host name: one whose first
// label is the base32 of its hash; false for the node's own names.
func (s *Server) programOfHost(host string) (message.ItemHash, bool) {
	if s.nodeHost(host) {
		return "", false
	}
	label, _, _ := strings.Cut(hostName(host), ".")
	return refFromLabel(label)
}

var b32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// refFromLabel decodes a DNS label holding the base32 (no padding) of a
// sha256 item hash.
func refFromLabel(label string) (message.ItemHash, bool) {
	raw, err := b32.DecodeString(strings.ToUpper(label))
	if err != nil || len(raw) != 32 {
		return "", false
	}
	return message.ItemHash(hex.EncodeToString(raw)), true
}

// LabelFromRef is the DNS label under which a program is served.
func LabelFromRef(ref message.ItemHash) (string, error) {
	raw, err := hex.DecodeString(string(ref))
	if err != nil || len(raw) != 32 {
		return "", errors.New("only sha256 item hashes have a host name")
	}
	return strings.ToLower(b32.EncodeToString(raw)), nil
}

func (s *Server) serveProgram(w http.ResponseWriter, r *http.Request, ref message.ItemHash, suffix string) {
	// Uploads, downloads and websockets of programs take as long as they
	// take; the program's resources.seconds bounds its first answer.
	streaming(w)
	if s.opts.MaxBodyBytes > 0 {
		if r.ContentLength > s.opts.MaxBodyBytes {
			refuseBody(w, r)
			writeError(w, http.StatusRequestEntityTooLarge, "Request body is larger than the node accepts")
			return
		}
		limitBody(w, r, s.opts.MaxBodyBytes)
	}
	lease, err := s.acquire(r.Context(), clientConnOf(r), ref)
	if errors.Is(err, errClientLeft) {
		// For the metrics (no one reads it): the request's context is
		// not done, a body not read yet, so nothing else says so.
		w.WriteHeader(499)
		return
	}
	if err != nil {
		s.writeStartError(w, ref, err)
		return
	}
	defer lease.Release()
	if !strings.HasPrefix(suffix, "/") {
		suffix = "/" + suffix
	}
	s.proxy.serve(w, r, lease, suffix)
}

// hotPrograms lease a warm program with no wait.
type hotPrograms interface {
	AcquireHot(ref message.ItemHash) *pool.Lease
}

// unresponsivePrograms stop a program whose VM no longer answers.
type unresponsivePrograms interface {
	Unresponsive(prog pool.Program, why string) bool
}

// How often a client waiting for its program to boot is looked at.
const bootProbeEvery = 250 * time.Millisecond

// acquire leases the program ref for a request of client c (nil when not
// known). While the program boots, c is looked at now and then: a client
// that left ends the wait (errClientLeft), so that its request never
// reaches the program (a POST given up on must not run later).
func (s *Server) acquire(ctx context.Context, c *clientConn, ref message.ItemHash) (*pool.Lease, error) {
	if h, ok := s.opts.Programs.(hotPrograms); ok {
		if l := h.AcquireHot(ref); l != nil {
			return l, nil
		}
	}
	if c == nil {
		return s.opts.Programs.Acquire(ctx, ref)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(bootProbeEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if c.gone() {
					cancel(errClientLeft)
					return
				}
			}
		}
	}()
	lease, err := s.opts.Programs.Acquire(ctx, ref)
	cancel(nil) // the first cause stays: errClientLeft if the client left first
	<-done
	if errors.Is(context.Cause(ctx), errClientLeft) {
		if lease != nil {
			lease.Release()
		}
		return nil, errClientLeft
	}
	return lease, err
}

func (s *Server) writeStartError(w http.ResponseWriter, ref message.ItemHash, err error) {
	var se StatusError
	switch {
	case errors.Is(err, pool.ErrInsufficientCapacity):
		w.Header().Set("Retry-After", "10")
		writeError(w, http.StatusServiceUnavailable, "Insufficient capacity")
	case errors.Is(err, pool.ErrDraining):
		writeError(w, http.StatusServiceUnavailable, "Server is draining, try another node")
	case errors.Is(err, context.Canceled):
		// The client went away; nobody reads this.
	case errors.As(err, &se):
		writeError(w, se.HTTPStatus(), se.Error())
	default:
		s.log.Error("program start failed", "ref", ref, "err", err)
		writeError(w, http.StatusInternalServerError, "Error during vm/runtime initialisation: "+err.Error())
	}
}

// execution is one row of the executions lists, program or instance.
type execution struct {
	ref         message.ItemHash
	vmType      string
	running     bool
	startedAt   time.Time
	vcpus       int
	memoryMiB   int
	networking  pool.Networking
	mappedPorts map[string]MappedPort
}

func (s *Server) executions(ctx context.Context) ([]execution, error) {
	var out []execution
	var programs []pool.ExecutionInfo
	if s.opts.Programs != nil {
		programs = s.opts.Programs.List()
	}
	for _, e := range programs {
		vmType := "microvm"
		if e.Plan != nil && e.Plan.Persistent {
			vmType = "persistent_program"
		}
		out = append(out, execution{ref: e.Ref, vmType: vmType, running: e.Running, startedAt: e.Since,
			vcpus: e.VCPUs, memoryMiB: e.MemoryMiB, networking: e.Networking})
	}
	if s.opts.Instances != nil {
		statuses, err := s.opts.Instances.Statuses(ctx)
		if err != nil {
			return nil, err
		}
		for _, st := range statuses {
			out = append(out, execution{ref: st.Ref, vmType: "instance", running: st.Running, startedAt: st.StartedAt,
				vcpus: st.VCPUs, memoryMiB: st.MemoryMiB, mappedPorts: st.MappedPorts,
				networking: pool.Networking{IPv4Network: st.IPv4Network, HostIPv4: st.HostIPv4, IPv4: st.IPv4, IPv6Network: st.IPv6Network, IPv6: st.IPv6}})
		}
	}
	return out, nil
}

// handleExecutionsList answers the running executions in the reference's
// first shape.
func (s *Server) handleExecutionsList(w http.ResponseWriter, r *http.Request) {
	// A VM without IPv6 (a node without IPV6_ADDRESS_POOL) shows null.
	type networking struct {
		IPv4 string  `json:"ipv4,omitempty"`
		IPv6 *string `json:"ipv6"`
	}
	type entry struct {
		Networking               networking `json:"networking"`
		VMType                   string     `json:"vm_type"`
		AwaitingConfidentialInit bool       `json:"awaiting_confidential_init"`
	}
	execs, err := s.executions(r.Context())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	out := map[message.ItemHash]entry{}
	for _, e := range execs {
		if e.running {
			out[e.ref] = entry{Networking: networking{IPv4: e.networking.IPv4Network, IPv6: orNull(e.networking.IPv6Network)}, VMType: e.vmType}
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// handleExecutionsListV2 answers every execution in the reference's second
// shape, with the instances' port mappings.
func (s *Server) handleExecutionsListV2(w http.ResponseWriter, r *http.Request) {
	// A VM with a network shows its mapped ports, {} when none, as the
	// reference does; one without shows an empty networking.
	type networking struct {
		pool.Networking
		// null without IPv6, shadowing the embedded fields.
		IPv6Network *string                `json:"ipv6_network"`
		IPv6        *string                `json:"ipv6_ip"`
		MappedPorts *map[string]MappedPort `json:"mapped_ports,omitempty"`
	}
	type status struct {
		StartedAt *string `json:"started_at"`
	}
	type entry struct {
		Networking               networking `json:"networking"`
		Status                   status     `json:"status"`
		Running                  bool       `json:"running"`
		AwaitingConfidentialInit bool       `json:"awaiting_confidential_init"`
		VMType                   string     `json:"vm_type"`
		VCPUs                    int        `json:"vcpus"`
		MemoryMiB                int        `json:"memory"`
	}
	execs, err := s.executions(r.Context())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	out := map[message.ItemHash]entry{}
	for _, e := range execs {
		var started *string
		if e.running && !e.startedAt.IsZero() {
			t := e.startedAt.UTC().Format("2006-01-02 15:04:05.000000+00:00")
			started = &t
		}
		n := networking{Networking: e.networking}
		if e.networking.IPv4Network != "" {
			n.IPv6Network, n.IPv6 = orNull(e.networking.IPv6Network), orNull(e.networking.IPv6)
			mp := e.mappedPorts
			if mp == nil {
				mp = map[string]MappedPort{}
			}
			n.MappedPorts = &mp
		}
		out[e.ref] = entry{Networking: n,
			Status: status{StartedAt: started}, Running: e.running, VMType: e.vmType, VCPUs: e.vcpus, MemoryMiB: e.memoryMiB}
	}
	writeJSON(w, http.StatusOK, out)
}

// orNull is s, or JSON's null when s is empty.
func orNull(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
