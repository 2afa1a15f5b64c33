package metrics

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// userHZ is the unit of the CPU times in /proc/<pid>/stat: the kernel
// reports them in USER_HZ, 100 on every Linux architecture this node runs
// on.
const userHZ = 100

// procStat is what /proc/<pid>/stat and statm say of a process.
type procStat struct {
	cpuSeconds float64
	rssBytes   uint64
}

var pageSize = uint64(os.Getpagesize())

// readProcStat reads the CPU time (user and system) and the resident
// memory of process pid.
func readProcStat(proc string, pid int) (procStat, error) {
	dir := filepath.Join(proc, strconv.Itoa(pid))
	data, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return procStat{}, err
	}
	// The command name, in parentheses, may hold spaces and parentheses:
	// the fields start after the last one.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("%s/stat: no command name", dir)
	}
	f := bytes.Fields(data[i+1:])
	// f[0] is field 3 (state): utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("%s/stat: %d fields", dir, len(f)+2)
	}
	utime, err1 := strconv.ParseUint(string(f[11]), 10, 64)
	stime, err2 := strconv.ParseUint(string(f[12]), 10, 64)
	if err1 != nil || err2 != nil {
		return procStat{}, fmt.Errorf("%s/stat: CPU times %q %q", dir, f[11], f[12])
	}
	st := procStat{cpuSeconds: float64(utime+stime) / userHZ}
	data, err = os.ReadFile(filepath.Join(dir, "statm"))
	if err != nil {
		return procStat{}, err
	}
	f = bytes.Fields(data)
	if len(f) < 2 {
		return procStat{}, fmt.Errorf("%s/statm: %d fields", dir, len(f))
	}
	pages, err := strconv.ParseUint(string(f[1]), 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("%s/statm: resident pages %q", dir, f[1])
	}
	st.rssBytes = pages * pageSize
	return st, nil
}

// readProcIO reads what process pid read from and wrote to storage, for a
// hypervisor whose monitor gives no disk counters: its bytes are those
// that reached the block layer, its operations the read and write system
// calls (of every kind: an approximation).
func readProcIO(proc string, pid int) (DiskIO, error) {
	path := filepath.Join(proc, strconv.Itoa(pid), "io")
	data, err := os.ReadFile(path)
	if err != nil {
		return DiskIO{}, err
	}
	var io DiskIO
	seen := 0
	for line := range bytes.Lines(data) {
		key, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		var field *uint64
		switch string(key) {
		case "read_bytes":
			field = &io.ReadBytes
		case "write_bytes":
			field = &io.WriteBytes
		case "syscr":
			field = &io.ReadOps
		case "syscw":
			field = &io.WriteOps
		default:
			continue
		}
		n, err := strconv.ParseUint(string(bytes.TrimSpace(value)), 10, 64)
		if err != nil {
			return DiskIO{}, fmt.Errorf("%s: %s %q", path, key, bytes.TrimSpace(value))
		}
		*field = n
		seen++
	}
	if seen != 4 {
		return DiskIO{}, fmt.Errorf("%s: %d of the 4 counters", path, seen)
	}
	return io, nil
}

// netCounters are an interface's counters, as the host sees them.
type netCounters struct {
	rxBytes, rxPackets, txBytes, txPackets uint64
}

// readNetDev reads every interface's counters from one read of
// /proc/net/dev (of the node's network namespace).
func readNetDev(proc string) (map[string]netCounters, error) {
	path := filepath.Join(proc, "net", "dev")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]netCounters{}
	for line := range bytes.Lines(data) {
		name, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue // the two header lines
		}
		f := bytes.Fields(rest)
		if len(f) < 10 {
			return nil, fmt.Errorf("%s: %d fields for %s", path, len(f), bytes.TrimSpace(name))
		}
		var v [4]uint64
		for i, col := range []int{0, 1, 8, 9} {
			if v[i], err = strconv.ParseUint(string(f[col]), 10, 64); err != nil {
				return nil, fmt.Errorf("%s: %s: %q", path, bytes.TrimSpace(name), f[col])
			}
		}
		out[string(bytes.TrimSpace(name))] = netCounters{rxBytes: v[0], rxPackets: v[1], txBytes: v[2], txPackets: v[3]}
	}
	return out, nil
}
