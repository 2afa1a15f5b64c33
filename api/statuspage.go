package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	vms "github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/message"
)

// The status page at / shows the operator the node: its identity and
// version, its capacity, every VM with its state, resources, addresses,
// ports and uptime, the recent cold starts phase by phase, and the
// self-checks' results. It is rendered on the server (html/template, no
// build step); its style and its one script are in the page, each allowed
// by its hash in the Content-Security-Policy, so that no other script runs
// on it, not even one a program serves on the node's origin. The script
// replaces the page's body with a fresh one every 5 s; without
// JavaScript, the page reloads itself as often.

// StatusSource says what the status page shows of the node beyond its
// VMs.
type StatusSource interface {
	NodeStatus(ctx context.Context) (NodeStatus, error)
}

// NodeStatus is the node as the status page shows it.
type NodeStatus struct {
	// Hostname is the machine's name.
	Hostname  string
	StartedAt time.Time
	// Memory (bytes), VCPUs and Disk (bytes, the filesystem of the VMs'
	// volumes): what the VMs hold and what the node may give.
	Memory, VCPUs, Disk Usage
	// RecentStarts are the last cold starts, newest first.
	RecentStarts []vms.ColdStart
}

// Usage is an amount used out of a capacity.
type Usage struct {
	Used, Capacity int64
}

// SelfChecks gives the results of the node's self-checks (the
// /status/check/* routes) for the status page. The page is read every
// 5 s: CheckResults returns the results known, it does not run checks.
type SelfChecks interface {
	CheckResults(ctx context.Context) []CheckResult
}

// CheckResult is one self-check's last result.
type CheckResult struct {
	Name   string
	Passed bool
	// Detail says what failed, or what was checked.
	Detail    string
	CheckedAt time.Time
}

//go:embed status
var statusFiles embed.FS

// statusPage is the page's template and its Content-Security-Policy.
type statusPage struct {
	tmpl    *template.Template
	csp     string
	css, js string
}

// pageAsset returns an embedded file of the page.
func pageAsset(name string) string {
	data, err := statusFiles.ReadFile("status/" + name)
	if err != nil {
		panic(err) // embedded at build time
	}
	return string(data)
}

func cspHash(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

// The markers the style and the script replace in a rendered page: the
// template would alter them (it drops comments from scripts and styles),
// and their hashes must be of their exact text.
const (
	styleMarker  = "__STYLE__"
	scriptMarker = "__SCRIPT__"
)

func newStatusPage() *statusPage {
	css, js := pageAsset("page.css"), pageAsset("page.js")
	tmpl := template.Must(template.New("page").Funcs(template.FuncMap{
		"bytes": formatBytes, "duration": formatDuration, "ms": formatMillis,
		"mul100": func(f float64) float64 { return 100 * f },
	}).Parse(pageAsset("page.html")))
	csp := strings.Join([]string{
		"default-src 'none'", "script-src " + cspHash(js), "style-src " + cspHash(css), "connect-src 'self'",
		"img-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
	}, "; ")
	return &statusPage{tmpl: tmpl, csp: csp, css: css, js: js}
}

// render renders the page with data, its style and script put in: the
// style in the head, before any of data, the script after all of it.
func (p *statusPage) render(data pageData) ([]byte, error) {
	var buf bytes.Buffer
	if err := p.tmpl.Execute(&buf, data); err != nil {
		return nil, err
	}
	page := buf.String()
	style, script := strings.Index(page, styleMarker), strings.LastIndex(page, scriptMarker)
	if style < 0 || script < style {
		return nil, errors.New("the page template lost its style or script")
	}
	return []byte(page[:style] + p.css + page[style+len(styleMarker):script] + p.js + page[script+len(scriptMarker):]), nil
}

// page data, as the template reads it.
type (
	pageData struct {
		Version, Domain, Hostname string
		Now                       time.Time
		NodeUptime                time.Duration
		StatusErr                 string
		Capacity                  []capacityRow
		VMs                       []vmRow
		Running                   int
		Starts                    []startRow
		ChecksWired               bool
		Checks                    []CheckResult
		ChecksFailed              int
	}
	capacityRow struct {
		Name, Used, Free, Capacity string
		Ratio                      float64
	}
	vmRow struct {
		Ref, Short, Type, State, Memory, IPv4, IPv6, Ports string
		VCPUs                                              int
		Uptime                                             time.Duration
	}
	startRow struct {
		At               time.Time
		Ref, Short, Type string
		Total            time.Duration
		Phases           []vms.Phase
		Error            string
	}
)

func (s *Server) handleStatusPage(w http.ResponseWriter, r *http.Request) {
	data := pageData{Version: s.opts.Version, Domain: s.opts.Domain, Now: time.Now().UTC()}
	if s.opts.Status != nil {
		st, err := s.opts.Status.NodeStatus(r.Context())
		if err != nil {
			data.StatusErr = err.Error()
		}
		data.Hostname = st.Hostname
		if !st.StartedAt.IsZero() {
			data.NodeUptime = time.Since(st.StartedAt)
		}
		data.Capacity = []capacityRow{
			capacity("Memory", st.Memory, formatBytes),
			capacity("vCPUs", st.VCPUs, func(n int64) string { return strconv.FormatInt(n, 10) }),
			capacity("Disk", st.Disk, formatBytes),
		}
		for _, c := range st.RecentStarts {
			row := startRow{At: c.At.UTC(), Ref: string(c.Ref), Short: short(c.Ref), Type: c.Type, Total: c.Total, Phases: c.Phases}
			if c.Err != nil {
				row.Error = c.Err.Error()
			}
			data.Starts = append(data.Starts, row)
		}
	}
	execs, err := s.executions(r.Context())
	if err != nil {
		data.StatusErr = strings.TrimPrefix(data.StatusErr+"; ", "; ") + err.Error()
	}
	for _, e := range execs {
		data.VMs = append(data.VMs, vmPageRow(e))
		if e.running {
			data.Running++
		}
	}
	sort.Slice(data.VMs, func(i, j int) bool {
		a, b := data.VMs[i], data.VMs[j]
		if a.State != b.State {
			return a.State == "running"
		}
		return a.Ref < b.Ref
	})
	if s.opts.Checks != nil {
		data.ChecksWired = true
		data.Checks = s.opts.Checks.CheckResults(r.Context())
		for _, c := range data.Checks {
			if !c.Passed {
				data.ChecksFailed++
			}
		}
	}
	page, err := s.page.render(data)
	if err != nil {
		s.log.Error("render the status page", "err", err)
		writeError(w, http.StatusInternalServerError, "the status page could not be rendered")
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", s.page.csp)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(page)
	}
}

func capacity(name string, u Usage, format func(int64) string) capacityRow {
	row := capacityRow{Name: name, Used: format(u.Used), Capacity: format(u.Capacity), Free: format(max(0, u.Capacity-u.Used))}
	if u.Capacity > 0 {
		row.Ratio = min(1, float64(u.Used)/float64(u.Capacity))
	}
	if u.Capacity == 0 {
		row.Capacity, row.Free = "unlimited", "unlimited"
	}
	return row
}

func vmPageRow(e execution) vmRow {
	row := vmRow{Ref: string(e.ref), Short: short(e.ref), Type: e.vmType, VCPUs: e.vcpus,
		Memory: formatBytes(int64(e.memoryMiB) << 20), IPv4: e.networking.IPv4, IPv6: e.networking.IPv6}
	switch {
	case e.running:
		row.State = "running"
		if !e.startedAt.IsZero() {
			row.Uptime = time.Since(e.startedAt)
		}
	case e.vmType == "instance":
		row.State = "stopped"
	default:
		row.State = "starting"
	}
	if row.Type == "microvm" {
		row.Type = "program"
	}
	row.Ports = formatPorts(e.mappedPorts)
	return row
}

// formatPorts shows the forwards as host->guest/proto, by guest port.
func formatPorts(ports map[string]MappedPort) string {
	type fwd struct {
		guest int
		text  string
	}
	var out []fwd
	for guest, m := range ports {
		g, _ := strconv.Atoi(guest)
		for _, p := range []struct {
			on    bool
			proto string
		}{{m.TCP, "tcp"}, {m.UDP, "udp"}} {
			if p.on {
				out = append(out, fwd{g, fmt.Sprintf("%d->%s/%s", m.Host, guest, p.proto)})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].guest != out[j].guest {
			return out[i].guest < out[j].guest
		}
		return out[i].text < out[j].text
	})
	texts := make([]string, len(out))
	for i, f := range out {
		texts[i] = f.text
	}
	return strings.Join(texts, " ")
}

func short(ref message.ItemHash) string {
	if len(ref) > 12 {
		return string(ref[:12]) + "…"
	}
	return string(ref)
}

func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	f, i := float64(n), 0
	for f >= unit && i < 5 {
		f /= unit
		i++
	}
	return strconv.FormatFloat(f, 'f', 1, 64) + " " + string("BKMGTP"[i]) + "iB"
}

// formatDuration shows an uptime: 3d 4h, 2h 5m, 4m 10s, 12s.
func formatDuration(d time.Duration) string {
	d = d.Round(time.Second)
	days, h, m, s := int(d.Hours())/24, int(d.Hours())%24, int(d.Minutes())%60, int(d.Seconds())%60
	switch {
	case days > 0:
		return fmt.Sprintf("%dd %dh", days, h)
	case h > 0:
		return fmt.Sprintf("%dh %dm", h, m)
	case m > 0:
		return fmt.Sprintf("%dm %ds", m, s)
	}
	return fmt.Sprintf("%ds", s)
}

// formatMillis shows a phase's or a start's duration.
func formatMillis(d time.Duration) string {
	if d >= 10*time.Second {
		return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + " s"
	}
	return strconv.FormatInt(d.Milliseconds(), 10) + " ms"
}
