package pool

import (
	"math"
	"strings"
	"testing"
)

func TestParseMemTotal(t *testing.T) {
	good := "MemTotal:       24578344 kB\nMemFree:        1234 kB\n"
	if mib, err := parseMemTotal(strings.NewReader(good)); err != nil || mib != 24002 {
		t.Errorf("%d %v", mib, err)
	}
	if mib, err := MemTotalMiB(); err != nil || mib <= 0 {
		t.Errorf("this host: %d %v", mib, err)
	}
	for name, bad := range map[string]string{
		"empty":         "",
		"no MemTotal":   "MemFree: 1 kB\n",
		"not number":    "MemTotal: lots kB\n",
		"negative":      "MemTotal: -4096 kB\n",
		"under 1 MiB":   "MemTotal: 12 kB\n",
		"overflow":      "MemTotal: 99999999999999999999999 kB\n",
		"huge":          "MemTotal: 9000000000000000 kB\n",
		"no unit":       "MemTotal: 4096\n",
		"other unit":    "MemTotal: 4 GB\n",
		"no value":      "MemTotal:\n",
		"line too long": "MemTotal: " + strings.Repeat("1", 100000) + " kB\n",
	} {
		if mib, err := parseMemTotal(strings.NewReader(bad)); err == nil {
			t.Errorf("%s: read %d MiB", name, mib)
		}
	}
}

func TestHostCapacity(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		total, reserved, cpus int
		overcommit            float64
		want                  Capacity
	}{
		{"usual", 24002, 2048, 2, 4, Capacity{MemoryMiB: 21954, VCPUs: 8}},
		{"memory unknown: no memory limit", 0, 2048, 2, 4, Capacity{VCPUs: 8}},
		{"overcommit under one CPU still gives one", 4096, 0, 1, 0.25, Capacity{MemoryMiB: 4096, VCPUs: 1}},
		{"huge overcommit is bounded", 4096, 0, 64, 1e300, Capacity{MemoryMiB: 4096, VCPUs: math.MaxInt32}},
	} {
		got, err := HostCapacity(tc.total, tc.reserved, tc.cpus, tc.overcommit)
		if err != nil || got != tc.want {
			t.Errorf("%s: %+v %v, want %+v", tc.name, got, err, tc.want)
		}
	}
	// Each of these would have given a zero or negative limit, which the
	// pool reads as no limit at all.
	for _, tc := range []struct {
		name                  string
		total, reserved, cpus int
		overcommit            float64
	}{
		{"reserve is the whole host", 2048, 2048, 2, 4},
		{"reserve over the host", 1900, 2048, 2, 4},
		{"negative reserve", 2048, -100, 2, 4},
		{"no CPUs", 2048, 0, 0, 4},
		{"zero overcommit", 2048, 0, 2, 0},
		{"negative overcommit", 2048, 0, 2, -1},
		{"NaN overcommit", 2048, 0, 2, math.NaN()},
		{"infinite overcommit", 2048, 0, 2, math.Inf(1)},
	} {
		if got, err := HostCapacity(tc.total, tc.reserved, tc.cpus, tc.overcommit); err == nil {
			t.Errorf("%s: %+v", tc.name, got)
		}
	}
}
