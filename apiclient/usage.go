package apiclient

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"sort"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// VMUsage is what one VM holds and has used, as the node's metrics say:
// counters since the VM started, to be turned into rates by the caller.
type VMUsage struct {
	Ref, Type, Hypervisor string
	Up                    bool
	Uptime                time.Duration
	VCPUs                 int
	// CPUSeconds is the CPU time of the VM's hypervisor process.
	CPUSeconds float64
	// MemoryUsed is the resident memory of its process, MemoryAssigned
	// what the VM was given, in bytes.
	MemoryUsed, MemoryAssigned uint64
	DiskRead, DiskWritten      uint64 // bytes
	NetReceived, NetSent       uint64 // bytes, as the guest sees them
}

// Usage is one reading of the node's metrics.
type Usage struct {
	At  time.Time
	VMs []VMUsage // sorted by ref
}

// Usage reads the node's /metrics (Prometheus's text format) and returns
// each VM's usage.
func (c *Client) Usage(ctx context.Context) (Usage, error) {
	data, err := c.do(ctx, http.MethodGet, "/metrics", nil)
	if err != nil {
		return Usage{}, err
	}
	at := time.Now()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(data))
	if err != nil {
		return Usage{}, fmt.Errorf("read the node's metrics: %w", err)
	}
	vms := map[string]*VMUsage{}
	each := func(name string, fn func(*VMUsage, float64)) {
		f := fams[name]
		if f == nil {
			return
		}
		for _, m := range f.Metric {
			labels := map[string]string{}
			for _, l := range m.Label {
				labels[l.GetName()] = l.GetValue()
			}
			ref := labels["item_hash"]
			if ref == "" {
				continue
			}
			vm := vms[ref]
			if vm == nil {
				vm = &VMUsage{Ref: ref, Type: labels["type"], Hypervisor: labels["hypervisor"]}
				vms[ref] = vm
			}
			fn(vm, value(m))
		}
	}
	each("alephvm_vm_up", func(v *VMUsage, x float64) { v.Up = x == 1 })
	each("alephvm_vm_uptime_seconds", func(v *VMUsage, x float64) { v.Uptime = time.Duration(x * float64(time.Second)) })
	each("alephvm_vm_vcpus", func(v *VMUsage, x float64) { v.VCPUs = int(x) })
	each("alephvm_vm_cpu_seconds_total", func(v *VMUsage, x float64) { v.CPUSeconds = x })
	each("alephvm_vm_memory_used_bytes", func(v *VMUsage, x float64) { v.MemoryUsed = uint64(x) })
	each("alephvm_vm_memory_assigned_bytes", func(v *VMUsage, x float64) { v.MemoryAssigned = uint64(x) })
	each("alephvm_vm_disk_read_bytes_total", func(v *VMUsage, x float64) { v.DiskRead = uint64(x) })
	each("alephvm_vm_disk_written_bytes_total", func(v *VMUsage, x float64) { v.DiskWritten = uint64(x) })
	each("alephvm_vm_network_receive_bytes_total", func(v *VMUsage, x float64) { v.NetReceived = uint64(x) })
	each("alephvm_vm_network_transmit_bytes_total", func(v *VMUsage, x float64) { v.NetSent = uint64(x) })
	out := Usage{At: at, VMs: make([]VMUsage, 0, len(vms))}
	for _, v := range vms {
		out.VMs = append(out.VMs, *v)
	}
	sort.Slice(out.VMs, func(i, j int) bool { return out.VMs[i].Ref < out.VMs[j].Ref })
	return out, nil
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return 0
}

// Rates is a VM's use per second between two readings.
type Rates struct {
	VMUsage
	// CPUPercent is the share of one CPU the VM used: 200 is two CPUs.
	CPUPercent                       float64
	DiskReadPerSec, DiskWritePerSec  float64 // bytes
	NetReceivedPerSec, NetSentPerSec float64 // bytes
}

// RatesSince returns each VM of u with its rates since before (a VM that
// was not in before, or restarted since, shows no rate), busiest first:
// by CPU, then memory used.
func (u Usage) RatesSince(before Usage) []Rates {
	prev := map[string]VMUsage{}
	for _, v := range before.VMs {
		prev[v.Ref] = v
	}
	dt := u.At.Sub(before.At).Seconds()
	out := make([]Rates, 0, len(u.VMs))
	for _, v := range u.VMs {
		r := Rates{VMUsage: v}
		if p, ok := prev[v.Ref]; ok && dt > 0 && v.CPUSeconds >= p.CPUSeconds && v.Uptime >= p.Uptime {
			rate := func(now, then uint64) float64 {
				if now < then {
					return 0
				}
				return float64(now-then) / dt
			}
			r.CPUPercent = 100 * (v.CPUSeconds - p.CPUSeconds) / dt
			r.DiskReadPerSec, r.DiskWritePerSec = rate(v.DiskRead, p.DiskRead), rate(v.DiskWritten, p.DiskWritten)
			r.NetReceivedPerSec, r.NetSentPerSec = rate(v.NetReceived, p.NetReceived), rate(v.NetSent, p.NetSent)
		}
		out = append(out, r)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].CPUPercent != out[j].CPUPercent {
			return out[i].CPUPercent > out[j].CPUPercent
		}
		return out[i].MemoryUsed > out[j].MemoryUsed
	})
	return out
}
