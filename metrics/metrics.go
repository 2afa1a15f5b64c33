// Package metrics exposes the node to Prometheus at /metrics: what each VM
// uses (read at scrape time from the hypervisor's process, its monitor and
// its tap, by a custom collector), what the node holds and can give, and
// what happened since it started (cold starts by phase, program requests,
// allocation calls, downloads, evictions), counted as it happens.
//
// Names follow node_exporter's and incus's: the alephvm_ prefix, base
// units (seconds, bytes), _total for counters. docs/operations.md lists
// them.
package metrics

import (
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/alephvm/alephvm/execution"
)

// RecentStarts is how many cold starts Recent keeps.
const RecentStarts = 20

// Options configure the node's metrics.
type Options struct {
	// Source is read at each scrape: the VMs and the node's capacity.
	Source Source
	// Proc is the proc filesystem the VMs' processes and the taps'
	// counters are read from (default /proc).
	Proc    string
	Version string
}

// Metrics is the node's registry: the collector read at scrape time and
// the counters of what happens.
type Metrics struct {
	reg *prometheus.Registry

	coldStarts        *prometheus.HistogramVec
	coldStartFailures *prometheus.CounterVec
	requests          *prometheus.CounterVec
	requestLatency    prometheus.Histogram
	allocations       *prometheus.CounterVec
	downloads         prometheus.Counter
	downloadBytes     prometheus.Counter
	downloadFailures  prometheus.Counter
	downloadsInFlight prometheus.Gauge
	evictions         prometheus.Counter
	evictedBytes      prometheus.Counter

	mu     sync.Mutex
	recent []execution.ColdStart // the last RecentStarts, oldest first
}

// Buckets of the histograms, in seconds: a phase of a start takes from a
// millisecond (a tap) to minutes (a download, a guest's boot under
// emulation); a request's first byte comes within its program's
// resources.seconds.
var (
	coldStartBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300}
	requestBuckets   = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}
)

// New returns the node's metrics, reading opts.Source at each scrape.
func New(opts Options) *Metrics {
	if opts.Proc == "" {
		opts.Proc = "/proc"
	}
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		coldStarts: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "alephvm_cold_start_duration_seconds",
			Help:    "Duration of the VM starts that succeeded, by phase (total: the whole start).",
			Buckets: coldStartBuckets,
		}, []string{"type", "phase"}),
		coldStartFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "alephvm_cold_start_failures_total",
			Help: "VM starts that failed.",
		}, []string{"type"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "alephvm_program_requests_total",
			Help: "Requests to programs, by HTTP status answered (499: the client left first).",
		}, []string{"code"}),
		requestLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "alephvm_program_request_duration_seconds",
			Help:    "Time from a program request's arrival to its answer's headers, cold starts included.",
			Buckets: requestBuckets,
		}),
		allocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "alephvm_allocation_requests_total",
			Help: "Calls of the scheduler's allocation routes, by route and HTTP status answered.",
		}, []string{"route", "code"}),
		downloads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "alephvm_downloads_total",
			Help: "Downloads of files into the store, started.",
		}),
		downloadBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "alephvm_download_bytes_total",
			Help: "Bytes received by the store's downloads.",
		}),
		downloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "alephvm_download_failures_total",
			Help: "Downloads into the store that failed.",
		}),
		downloadsInFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "alephvm_downloads_in_flight",
			Help: "Downloads into the store under way.",
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "alephvm_store_evictions_total",
			Help: "Files the store evicted to stay under its size limit.",
		}),
		evictedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "alephvm_store_evicted_bytes_total",
			Help: "Bytes of the files the store evicted.",
		}),
	}
	m.reg.MustRegister(m.coldStarts, m.coldStartFailures, m.requests, m.requestLatency, m.allocations,
		m.downloads, m.downloadBytes, m.downloadFailures, m.downloadsInFlight, m.evictions, m.evictedBytes,
		newCollector(opts.Source, opts.Proc),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "alephvm_build_info",
			Help:        "The node's version, as a label; always 1.",
			ConstLabels: prometheus.Labels{"version": opts.Version},
		}, func() float64 { return 1 }),
	)
	return m
}

// Handler serves the metrics in Prometheus's text format (or
// OpenMetrics, when the scraper asks). A source that fails is counted in
// alephvm_scrape_errors_total; the rest is served.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, MaxRequestsInFlight: 4})
}

// Registry is the registry the metrics are in, for tests that read it
// without HTTP.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ColdStart implements execution.StartObserver: a start that succeeded
// counts in the histogram, phase by phase; one that failed counts as a
// failure. Both are kept among the recent starts.
func (m *Metrics) ColdStart(s execution.ColdStart) {
	if s.Err != nil {
		m.coldStartFailures.WithLabelValues(s.Type).Inc()
	} else {
		for _, p := range s.Phases {
			m.coldStarts.WithLabelValues(s.Type, p.Name).Observe(p.Took.Seconds())
		}
		m.coldStarts.WithLabelValues(s.Type, "total").Observe(s.Total.Seconds())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.recent) == RecentStarts {
		copy(m.recent, m.recent[1:])
		m.recent = m.recent[:RecentStarts-1]
	}
	m.recent = append(m.recent, s)
}

// Recent returns the last cold starts, newest first.
func (m *Metrics) Recent() []execution.ColdStart {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]execution.ColdStart, len(m.recent))
	for i, s := range m.recent {
		out[len(out)-1-i] = s
	}
	return out
}

// ProgramRequest counts a request to a program, answered with code after
// took (to its answer's headers).
func (m *Metrics) ProgramRequest(code int, took time.Duration) {
	m.requests.WithLabelValues(strconv.Itoa(code)).Inc()
	m.requestLatency.Observe(took.Seconds())
}

// AllocationCall counts a call of the scheduler's route, answered with
// code.
func (m *Metrics) AllocationCall(route string, code int) {
	m.allocations.WithLabelValues(route, strconv.Itoa(code)).Inc()
}

// DownloadStarted counts a download into the store, under way until
// DownloadEnded.
func (m *Metrics) DownloadStarted() {
	m.downloads.Inc()
	m.downloadsInFlight.Inc()
}

// DownloadReceived counts n bytes a download received.
func (m *Metrics) DownloadReceived(n int) { m.downloadBytes.Add(float64(n)) }

// DownloadEnded ends a download started, failed when err is not nil.
func (m *Metrics) DownloadEnded(err error) {
	m.downloadsInFlight.Dec()
	if err != nil {
		m.downloadFailures.Inc()
	}
}

// Evicted counts a file of size bytes the store evicted.
func (m *Metrics) Evicted(size int64) {
	m.evictions.Inc()
	m.evictedBytes.Add(float64(size))
}
