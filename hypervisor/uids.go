package hypervisor

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// UIDsInUse returns the uids and gids from first to first+count-1 that a
// process has (real, effective, saved or filesystem), read from each
// /proc/PID/status under proc. Both backends run VMs as uids of their
// own, and a uid a process still has is not free, whoever started it.
func UIDsInUse(proc string, first, count int) (map[int]bool, error) {
	entries, err := os.ReadDir(proc)
	if err != nil {
		return nil, err
	}
	used := map[int]bool{}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		ids, err := ProcessIDs(filepath.Join(proc, e.Name(), "status"))
		if err != nil {
			continue // gone since
		}
		for _, id := range ids {
			if id >= first && id < first+count {
				used[id] = true
			}
		}
	}
	return used, nil
}

// ProcessIDs reads the uids and gids (real, effective, saved, fs) of a
// /proc/PID/status file.
func ProcessIDs(status string) ([]int, error) {
	f, err := os.Open(status)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ids []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "Uid:")
		if !ok {
			rest, ok = strings.CutPrefix(sc.Text(), "Gid:")
		}
		if !ok {
			continue
		}
		for _, field := range strings.Fields(rest) {
			if id, err := strconv.Atoi(field); err == nil {
				ids = append(ids, id)
			}
		}
	}
	return ids, sc.Err()
}
