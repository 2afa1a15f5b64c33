package pool

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
)

// HostCapacity decides what a host of memTotalMiB memory and cpus CPUs
// may give to VMs: its memory less reservedMiB, and its CPUs times
// overcommit (at least one vCPU). A memTotalMiB of 0 (unknown) gives no
// memory limit. A reserve that leaves the VMs nothing is an error: a
// zero limit would mean no limit.
func HostCapacity(memTotalMiB, reservedMiB, cpus int, overcommit float64) (Capacity, error) {
	if reservedMiB < 0 {
		return Capacity{}, fmt.Errorf("memory kept for the host is negative (%d MiB)", reservedMiB)
	}
	if cpus < 1 || !(overcommit > 0) || math.IsInf(overcommit, 0) {
		return Capacity{}, fmt.Errorf("%d CPUs with an overcommit factor of %v give no vCPUs", cpus, overcommit)
	}
	c := Capacity{VCPUs: max(1, int(min(float64(cpus)*overcommit, math.MaxInt32)))}
	if memTotalMiB > 0 {
		if c.MemoryMiB = memTotalMiB - reservedMiB; c.MemoryMiB <= 0 {
			return Capacity{}, fmt.Errorf("the %d MiB kept for the host leave nothing of its %d MiB to VMs", reservedMiB, memTotalMiB)
		}
	}
	return c, nil
}

// MemTotalMiB returns this host's memory, from /proc/meminfo.
func MemTotalMiB() (int, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return parseMemTotal(f)
}

// parseMemTotal reads the MemTotal line of a /proc/meminfo.
func parseMemTotal(r io.Reader) (int, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || fields[0] != "MemTotal:" {
			continue
		}
		if len(fields) != 3 || fields[2] != "kB" {
			return 0, fmt.Errorf("meminfo: MemTotal line %q is not \"MemTotal: N kB\"", sc.Text())
		}
		kb, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil || kb < 1024 || kb/1024 > math.MaxInt32 {
			return 0, fmt.Errorf("meminfo: MemTotal %q kB is not a memory size", fields[1])
		}
		return int(kb / 1024), nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("meminfo: %w", err)
	}
	return 0, errors.New("meminfo: no MemTotal line")
}
