package api

import (
	"cmp"
	"context"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/alephvm/alephvm/hostinfo"
)

// NodeInfo gives the status routes what they say of the node and its
// host: the scheduler reads /about/usage/system to place VMs, the
// network's monitors /about/capability and /status/config.
type NodeInfo interface {
	Host() (hostinfo.Host, error)
	Disk() (hostinfo.Disk, error)
	PublicConfig() PublicConfig
}

// PublicConfig is what /status/config exposes, as the reference names it.
type PublicConfig struct {
	DomainName                  string
	NodeHash                    string // empty: null
	APIServer                   string
	CheckFastAPIVMID            string
	UseJailer                   bool
	UseDeveloperSSHKeys         bool
	IPv6AddressPool             string
	IPv6Forwarding, UseNDPProxy bool
	InstanceDefaultHypervisor   string
	QEMU                        bool
}

// The shapes of the reference's answers (orchestrator/resources.py and
// views/__init__.py), field for field and in its order.
type (
	usageSystem struct {
		CPU struct {
			Count       int `json:"count"`
			LoadAverage struct {
				Load1  pyFloat `json:"load1"`
				Load5  pyFloat `json:"load5"`
				Load15 pyFloat `json:"load15"`
			} `json:"load_average"`
			CoreFrequencies struct {
				Min pyFloat `json:"min"`
				Max pyFloat `json:"max"`
			} `json:"core_frequencies"`
		} `json:"cpu"`
		Mem struct {
			TotalKB     uint64 `json:"total_kB"`
			AvailableKB uint64 `json:"available_kB"`
		} `json:"mem"`
		Disk struct {
			TotalKB     int64 `json:"total_kB"`
			AvailableKB int64 `json:"available_kB"`
		} `json:"disk"`
		Period struct {
			StartTimestamp  string  `json:"start_timestamp"`
			DurationSeconds pyFloat `json:"duration_seconds"`
		} `json:"period"`
		Properties struct {
			CPU cpuProperties `json:"cpu"`
		} `json:"properties"`
		GPU struct {
			Devices          []any `json:"devices"`
			AvailableDevices []any `json:"available_devices"`
		} `json:"gpu"`
		Active bool `json:"active"`
	}
	// cpuProperties is aleph-message's CpuProperties, without its null
	// fields (the usage route excludes them).
	cpuProperties struct {
		Architecture string   `json:"architecture,omitempty"`
		Vendor       string   `json:"vendor,omitempty"`
		Features     []string `json:"features"`
	}
	capability struct {
		CPU struct {
			Architecture *string  `json:"architecture"`
			Vendor       *string  `json:"vendor"`
			Features     []string `json:"features"`
			Model        *string  `json:"model"`
			Frequency    *int64   `json:"frequency"`
			Count        int      `json:"count"`
		} `json:"cpu"`
		Memory struct {
			Size       uint64  `json:"size"`
			Units      string  `json:"units"`
			Type       string  `json:"type"`
			Clock      *int64  `json:"clock"`
			ClockUnits *string `json:"clock_units"`
		} `json:"memory"`
	}
	statusConfig struct {
		DomainName string  `json:"DOMAIN_NAME"`
		NodeHash   *string `json:"node_hash"`
		Version    string  `json:"version"`
		References struct {
			APIServer        string  `json:"API_SERVER"`
			CheckFastAPIVMID string  `json:"CHECK_FASTAPI_VM_ID"`
			ConnectorURL     *string `json:"CONNECTOR_URL"`
		} `json:"references"`
		Security struct {
			UseJailer           bool `json:"USE_JAILER"`
			PrintSystemLogs     bool `json:"PRINT_SYSTEM_LOGS"`
			WatchForUpdates     bool `json:"WATCH_FOR_UPDATES"`
			AllowVMNetworking   bool `json:"ALLOW_VM_NETWORKING"`
			UseDeveloperSSHKeys bool `json:"USE_DEVELOPER_SSH_KEYS"`
		} `json:"security"`
		Networking struct {
			IPv6AddressPool       string `json:"IPV6_ADDRESS_POOL"`
			IPv6AllocationPolicy  string `json:"IPV6_ALLOCATION_POLICY"`
			IPv6SubnetPrefix      int    `json:"IPV6_SUBNET_PREFIX"`
			IPv6ForwardingEnabled bool   `json:"IPV6_FORWARDING_ENABLED"`
			UseNDPProxy           bool   `json:"USE_NDP_PROXY"`
		} `json:"networking"`
		Debug struct {
			SentryDSNConfigured bool `json:"SENTRY_DSN_CONFIGURED"`
			DebugAsyncio        bool `json:"DEBUG_ASYNCIO"`
			ExecutionLogEnabled bool `json:"EXECUTION_LOG_ENABLED"`
		} `json:"debug"`
		Payment struct {
			PaymentReceiverAddress *string        `json:"PAYMENT_RECEIVER_ADDRESS"`
			AvailablePayments      map[string]any `json:"AVAILABLE_PAYMENTS"`
			PaymentMonitorInterval pyFloat        `json:"PAYMENT_MONITOR_INTERVAL"`
		} `json:"payment"`
		Computing struct {
			EnableQEMUSupport           bool   `json:"ENABLE_QEMU_SUPPORT"`
			InstanceDefaultHypervisor   string `json:"INSTANCE_DEFAULT_HYPERVISOR"`
			EnableConfidentialComputing bool   `json:"ENABLE_CONFIDENTIAL_COMPUTING"`
			EnableGPUSupport            bool   `json:"ENABLE_GPU_SUPPORT"`
		} `json:"computing"`
	}
)

// cors answers as the reference's cors_allow_all (aiohttp_cors: every
// origin, with credentials, every header exposed): preflights included.
func cors(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if origin := r.Header.Get("Origin"); origin != "" {
			w.Header().Set("Access-Control-Allow-Origin", origin)
			w.Header().Set("Access-Control-Allow-Credentials", "true")
			if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
				w.Header().Set("Access-Control-Allow-Methods", r.Header.Get("Access-Control-Request-Method"))
				if h := r.Header.Get("Access-Control-Request-Headers"); h != "" {
					w.Header().Set("Access-Control-Allow-Headers", h)
				}
				w.WriteHeader(http.StatusOK)
				return
			}
			w.Header().Set("Access-Control-Expose-Headers", "*")
		}
		h(w, r)
	}
}

// writeRaw writes a JSON answer already encoded.
func writeRaw(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	w.Write(body)
}

func (s *Server) handleUsageSystem(w http.ResponseWriter, r *http.Request) {
	if s.opts.NodeInfo == nil {
		writeError(w, http.StatusServiceUnavailable, "this node does not report its usage")
		return
	}
	h, err := s.opts.NodeInfo.Host()
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	d, err := s.opts.NodeInfo.Disk()
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	body, err := compactJSON(usageOf(h, d, s.now()))
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeRaw(w, http.StatusOK, body)
}

func (s *Server) now() time.Time {
	if s.opts.Now != nil {
		return s.opts.Now()
	}
	return time.Now()
}

// usageOf is the reference's MachineUsage.
func usageOf(h hostinfo.Host, d hostinfo.Disk, now time.Time) usageSystem {
	var u usageSystem
	u.CPU.Count = h.CPUs
	u.CPU.LoadAverage.Load1, u.CPU.LoadAverage.Load5, u.CPU.LoadAverage.Load15 = pyFloat(h.Load[0]), pyFloat(h.Load[1]), pyFloat(h.Load[2])
	u.CPU.CoreFrequencies.Min, u.CPU.CoreFrequencies.Max = pyFloat(h.FreqMinMHz), pyFloat(h.FreqMaxMHz)
	u.Mem.TotalKB = uint64(math.Ceil(float64(h.MemTotal) / 1000))
	u.Mem.AvailableKB = h.MemAvailable / 1000
	u.Disk.TotalKB, u.Disk.AvailableKB = d.Total/1000, d.Available/1000
	u.Period.StartTimestamp = now.UTC().Truncate(time.Minute).Format("2006-01-02T15:04:05Z")
	u.Period.DurationSeconds = 60
	u.Properties.CPU = cpuProperties{Architecture: h.Arch, Vendor: h.Vendor, Features: nonNil(h.Features)}
	u.GPU.Devices, u.GPU.AvailableDevices = []any{}, []any{}
	u.Active = true
	return u
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (s *Server) handleCapability(w http.ResponseWriter, r *http.Request) {
	if s.opts.NodeInfo == nil {
		writeError(w, http.StatusServiceUnavailable, "this node does not report its capability")
		return
	}
	h, err := s.opts.NodeInfo.Host()
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	body, err := compactJSON(capabilityOf(h))
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeRaw(w, http.StatusOK, body)
}

// capabilityOf is the reference's MachineCapability. The memory's type
// and clock come from lshw there; this node does not read SMBIOS, so they
// are "" and null, as the reference says of a host whose lshw knows none.
func capabilityOf(h hostinfo.Host) capability {
	var c capability
	str := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	c.CPU.Architecture, c.CPU.Vendor, c.CPU.Model = str(h.Arch), str(h.Vendor), str(h.Model)
	c.CPU.Features = nonNil(h.Features)
	if h.FrequencyHz > 0 {
		c.CPU.Frequency = &h.FrequencyHz
	}
	c.CPU.Count = h.CPUs
	c.Memory.Size, c.Memory.Units = h.MemTotal, "bytes"
	return c
}

func (s *Server) handleStatusConfig(w http.ResponseWriter, r *http.Request) {
	if s.opts.NodeInfo == nil {
		writeError(w, http.StatusServiceUnavailable, "this node does not report its configuration")
		return
	}
	body, err := pythonJSON(statusConfigOf(s.opts.NodeInfo.PublicConfig(), s.opts.Version))
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeRaw(w, http.StatusOK, body)
}

// statusConfigOf fills the reference's public configuration. Settings this
// node does not have are given the value that says what it does: no
// connector (null), no payment receiver (null), no GPU, no confidential
// computing, logs of the system not printed.
func statusConfigOf(p PublicConfig, version string) statusConfig {
	var c statusConfig
	c.DomainName, c.Version = p.DomainName, version
	if p.NodeHash != "" {
		c.NodeHash = &p.NodeHash
	}
	c.References.APIServer, c.References.CheckFastAPIVMID = p.APIServer, p.CheckFastAPIVMID
	c.Security.UseJailer, c.Security.AllowVMNetworking, c.Security.UseDeveloperSSHKeys = p.UseJailer, true, p.UseDeveloperSSHKeys
	c.Networking.IPv6AddressPool = p.IPv6AddressPool
	// str() of the reference's (str, Enum) under Python 3.11, as it sends it.
	c.Networking.IPv6AllocationPolicy = "IPv6AllocationPolicy.static"
	c.Networking.IPv6SubnetPrefix = 124
	c.Networking.IPv6ForwardingEnabled, c.Networking.UseNDPProxy = p.IPv6Forwarding, p.UseNDPProxy
	c.Payment.AvailablePayments = map[string]any{}
	c.Payment.PaymentMonitorInterval = 60
	c.Computing.EnableQEMUSupport, c.Computing.InstanceDefaultHypervisor = p.QEMU, p.InstanceDefaultHypervisor
	return c
}

// handleCheckVersion answers whether the node runs reference or later.
func (s *Server) handleCheckVersion(w http.ResponseWriter, r *http.Request) {
	ref := r.URL.Query().Get("reference")
	if ref == "" {
		http.Error(w, "Query field '?reference=` must be specified", http.StatusBadRequest)
		return
	}
	want, ok := parseVersion(ref)
	if !ok {
		http.Error(w, "Invalid version: '"+ref+"'", http.StatusBadRequest)
		return
	}
	have, ok := parseVersion(s.opts.Version)
	if !ok {
		http.Error(w, "Invalid version: '"+s.opts.Version+"'", http.StatusServiceUnavailable)
		return
	}
	if compareVersions(have, want) >= 0 {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("Up-to-date: version " + s.opts.Version + " >= " + ref))
		return
	}
	http.Error(w, "Outdated: version "+s.opts.Version+" < "+ref, http.StatusForbidden)
}

// parseVersion reads a release number: digits separated by dots, with an
// optional leading v (this node's and the reference's tags).
func parseVersion(v string) ([]int, bool) {
	v = strings.TrimPrefix(v, "v")
	if v == "" {
		return nil, false
	}
	var parts []int
	for _, p := range strings.Split(v, ".") {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || p == "" {
			return nil, false
		}
		parts = append(parts, n)
	}
	return parts, true
}

// compareVersions compares release numbers, missing parts being 0.
func compareVersions(a, b []int) int {
	for i := range max(len(a), len(b)) {
		var x, y int
		if i < len(a) {
			x = a[i]
		}
		if i < len(b) {
			y = b[i]
		}
		if c := cmp.Compare(x, y); c != 0 {
			return c
		}
	}
	return 0
}

// HostChecker checks the host's connectivity, as the reference's
// /status/check/host and /status/check/ipv6.
type HostChecker interface {
	// CheckHost returns the route's JSON and whether the required checks
	// passed.
	CheckHost(ctx context.Context) ([]byte, bool)
	CheckIPv6(ctx context.Context) []byte
}

func (s *Server) handleCheckHost(w http.ResponseWriter, r *http.Request) {
	if s.opts.HostCheck == nil {
		writeError(w, http.StatusServiceUnavailable, "this node does not check its host")
		return
	}
	body, ok := s.opts.HostCheck.CheckHost(r.Context())
	status := http.StatusOK
	if !ok {
		status = http.StatusServiceUnavailable
	}
	writeRaw(w, status, body)
}

func (s *Server) handleCheckIPv6(w http.ResponseWriter, r *http.Request) {
	if s.opts.HostCheck == nil {
		writeError(w, http.StatusServiceUnavailable, "this node does not check its host")
		return
	}
	writeRaw(w, http.StatusOK, s.opts.HostCheck.CheckIPv6(r.Context()))
}
