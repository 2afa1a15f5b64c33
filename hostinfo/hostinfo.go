// Package hostinfo reads what the node's status routes say of its host:
// CPUs, load, memory, the CPU's make and features, and the disk the VMs
// use, less what their disks may still grow by.
package hostinfo

import (
	"bufio"
	"bytes"
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Host is a reading of the host.
type Host struct {
	CPUs         int
	Load         [3]float64
	FreqMinMHz   float64 // the CPUs' frequency range, as psutil.cpu_freq
	FreqMaxMHz   float64
	MemTotal     uint64 // bytes
	MemAvailable uint64
	Arch         string // x86_64 or arm64, as aleph-message names them; "" when other
	Vendor       string // AuthenticAMD, GenuineIntel...
	Model        string
	FrequencyHz  int64    // the CPU's nominal frequency
	Features     []string // sev, sev_es, sev_snp, as the host supports them
}

// Reader reads the host under Root ("/" on a node; a fake tree in tests).
type Reader struct{ Root string }

func (r Reader) path(p string) string { return filepath.Join(cmp.Or(r.Root, "/"), p) }

// Read reads the host.
func (r Reader) Read() (Host, error) {
	var h Host
	cpuinfo, err := os.ReadFile(r.path("proc/cpuinfo"))
	if err != nil {
		return h, fmt.Errorf("read cpuinfo: %w", err)
	}
	var mhz []float64
	for _, block := range bytes.Split(cpuinfo, []byte("\n\n")) {
		fields := cpuFields(block)
		if _, ok := fields["processor"]; !ok {
			continue
		}
		h.CPUs++
		h.Vendor = cmp.Or(h.Vendor, fields["vendor_id"])
		h.Model = cmp.Or(h.Model, fields["model name"])
		if f, err := strconv.ParseFloat(fields["cpu MHz"], 64); err == nil {
			mhz = append(mhz, f)
		}
	}
	if h.CPUs == 0 {
		h.CPUs = runtime.NumCPU()
	}
	h.FreqMinMHz, h.FreqMaxMHz = r.frequencies(mhz)
	h.FrequencyHz = int64(h.FreqMaxMHz * 1e6)
	switch runtime.GOARCH {
	case "amd64":
		h.Arch = "x86_64"
	case "arm64":
		h.Arch = "arm64"
	}
	if loadavg, err := os.ReadFile(r.path("proc/loadavg")); err == nil {
		f := strings.Fields(string(loadavg))
		for i := 0; i < 3 && i < len(f); i++ {
			h.Load[i], _ = strconv.ParseFloat(f[i], 64)
		}
	}
	meminfo, err := os.ReadFile(r.path("proc/meminfo"))
	if err != nil {
		return h, fmt.Errorf("read meminfo: %w", err)
	}
	for _, line := range strings.Split(string(meminfo), "\n") {
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(value), " kB"), 10, 64)
		switch name {
		case "MemTotal":
			h.MemTotal = kb * 1024
		case "MemAvailable":
			h.MemAvailable = kb * 1024
		}
	}
	// AMD SEV, as the reference reads it (kvm_amd's parameters).
	for _, f := range []struct{ name, param string }{{"sev", "sev"}, {"sev_es", "sev_es"}, {"sev_snp", "sev_snp"}} {
		if b, err := os.ReadFile(r.path("sys/module/kvm_amd/parameters/" + f.param)); err == nil {
			if v := strings.TrimSpace(string(b)); v == "Y" || v == "1" {
				h.Features = append(h.Features, f.name)
			}
		}
	}
	return h, nil
}

// frequencies are the CPUs' range: cpufreq's limits where the host has
// them, else the current frequencies of /proc/cpuinfo (as psutil falls
// back to the current one in VMs).
func (r Reader) frequencies(current []float64) (lo, hi float64) {
	read := func(name string) float64 {
		b, err := os.ReadFile(r.path("sys/devices/system/cpu/cpu0/cpufreq/" + name))
		if err != nil {
			return 0
		}
		khz, _ := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
		return khz / 1000
	}
	lo, hi = read("cpuinfo_min_freq"), read("cpuinfo_max_freq")
	for _, f := range current {
		if lo == 0 || f < lo {
			lo = f
		}
		if f > hi {
			hi = f
		}
	}
	return lo, hi
}

func cpuFields(block []byte) map[string]string {
	fields := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(block))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return fields
}

// Disk is the space of the filesystem VMs' disks live on.
type Disk struct {
	Total int64
	// Available is what a new VM may still take (the node's disk ledger
	// says it: diskusage.Ledger.Available).
	Available int64
}

// DiskTotal is the size of the filesystem holding dir.
func DiskTotal(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("read the disk of %s: %w", dir, err)
	}
	return int64(st.Blocks) * st.Bsize, nil
}
