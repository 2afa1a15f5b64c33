package storage

import (
	"strings"
	"testing"
)

func TestVolumeFileName(t *testing.T) {
	long := strings.Repeat("a", 300)
	for _, tc := range []struct {
		name  string
		index int
		want  string
	}{
		{"data", 0, "data"}, // safe names keep their files
		{"a_b-C9", 0, "a_b-C9"},
		{"volume-x", 0, "volume-x"},
		{"a b", 0, "a%20b"},
		{"a%20b", 0, "a%2520b"},
		{"../../etc/shadow", 0, "%2E%2E%2F%2E%2E%2Fetc%2Fshadow"},
		{"é", 0, "%C3%A9"},
		{"", 3, "unnamed.3"},
		{"\x00", 0, "%00"},
	} {
		if got := VolumeFileName(tc.name, tc.index); got != tc.want {
			t.Errorf("%q: %q, want %q", tc.name, got, tc.want)
		}
	}
	if got := VolumeFileName(long, 0); len(got) > 200 || !strings.HasPrefix(got, "aaaa") || !strings.Contains(got, "~") {
		t.Errorf("long name: %q", got)
	}
	escapedLong := strings.Repeat(" ", 100)
	if got := VolumeFileName(escapedLong, 0); len(got) > 200 || strings.HasSuffix(strings.Split(got, "~")[0], "%2") {
		t.Errorf("long escaped name: %q", got)
	}
}

// TestVolumeFileNamesNeverMeet: distinct names, hostile ones included,
// never share a file, and every file name is one a filesystem takes.
func TestVolumeFileNamesNeverMeet(t *testing.T) {
	names := []string{"x", "volume-x", "a b", "a_b", "a%20b", "a%2520b", "a.b", "a/b", "a\\b", ".", "..", "-", "_",
		"unnamed.0", "unnamed%2E0", "A", "a", strings.Repeat("a", 200), strings.Repeat("a", 201), strings.Repeat("a", 202),
		strings.Repeat("a", 300), strings.Repeat("a", 300) + "b", strings.Repeat("%", 67), strings.Repeat("%", 68),
		strings.Repeat("a", 150) + "~" + strings.Repeat("0", 64), "\x00", "\n", "é", "e\u0301"}
	seen := map[string]string{}
	check := func(name, file string) {
		t.Helper()
		if other, ok := seen[file]; ok {
			t.Errorf("%q and %q share the file %q", other, name, file)
		}
		seen[file] = name
		if file == "" || len(file) > 200 || strings.ContainsAny(file, "/\x00") || file == "." || file == ".." {
			t.Errorf("%q: unusable file name %q", name, file)
		}
	}
	for _, n := range names {
		check(n, VolumeFileName(n, 0))
	}
	for i := range 3 {
		check("unnamed volume "+string(rune('0'+i)), VolumeFileName("", i))
	}
}

func FuzzVolumeFileName(f *testing.F) {
	f.Add("a b", "a_b")
	f.Add("x", "volume-x")
	f.Fuzz(func(t *testing.T, a, b string) {
		if a != "" && b != "" && a != b && VolumeFileName(a, 0) == VolumeFileName(b, 0) {
			t.Errorf("%q and %q share %q", a, b, VolumeFileName(a, 0))
		}
	})
}
