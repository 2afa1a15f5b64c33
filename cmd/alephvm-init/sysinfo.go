package main

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// Sysinfo implements guest.Agent.
func (in *Init) Sysinfo() (guest.Sysinfo, error) {
	info := guest.Sysinfo{Uptime: uptime(), CPUs: runtime.NumCPU()}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		info.Load = parseLoadavg(b)
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		m := parseMeminfo(b)
		info.MemTotal, info.MemAvailable = m["MemTotal"], m["MemAvailable"]
	}
	info.Processes, info.Zombies = countProcesses("/proc")
	in.mu.Lock()
	paths := append([]string{"/"}, in.mounted...)
	in.mu.Unlock()
	for _, p := range paths {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil {
			info.Mounts = append(info.Mounts, guest.MountUsage{Path: p, Total: st.Blocks * uint64(st.Bsize), Available: st.Bavail * uint64(st.Bsize)})
		}
	}
	links, _ := os.ReadDir("/sys/class/net")
	for _, l := range links {
		if l.Name() == "lo" {
			continue
		}
		dir := filepath.Join("/sys/class/net", l.Name(), "statistics")
		info.Network = append(info.Network, guest.NetCounters{
			Interface: l.Name(),
			RxBytes:   readUint(filepath.Join(dir, "rx_bytes")),
			TxBytes:   readUint(filepath.Join(dir, "tx_bytes")),
		})
	}
	return info, nil
}

func parseLoadavg(b []byte) [3]float64 {
	var load [3]float64
	for i, f := range strings.Fields(string(b)) {
		if i == 3 {
			break
		}
		load[i], _ = strconv.ParseFloat(f, 64)
	}
	return load
}

// parseMeminfo returns /proc/meminfo's values in bytes.
func parseMeminfo(b []byte) map[string]uint64 {
	m := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		if len(f) > 1 && f[1] == "kB" {
			v *= 1024
		}
		m[name] = v
	}
	return m
}

// countProcesses counts the processes in a proc filesystem, kernel
// threads aside, and those that are zombies.
func countProcesses(proc string) (all, zombies int) {
	entries, _ := os.ReadDir(proc)
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join(proc, e.Name(), "stat"))
		if err != nil {
			continue
		}
		// The state follows the command name, which is in parentheses and
		// may itself hold spaces and parentheses.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 || e.Name() == "2" || f[1] == "2" {
			continue // kthreadd and its children
		}
		if f[0] == "Z" {
			zombies++
		}
		all++
	}
	return all, zombies
}

func readUint(file string) uint64 {
	b, _ := os.ReadFile(file)
	v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return v
}
