package baseimage

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// tools are the host programs Build runs, with the Debian packages that
// have them.
var tools = map[string]string{"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs", "dumpe2fs": "e2fsprogs"}

// checkTools says which of the tools lookPath cannot find, and the
// command that installs them.
func checkTools(lookPath func(string) (string, error)) error {
	var missing, packages []string
	for _, tool := range slices.Sorted(maps.Keys(tools)) {
		if _, err := lookPath(tool); err != nil {
			missing = append(missing, tool)
			packages = append(packages, tools[tool])
		}
	}
	if len(missing) > 0 {
		slices.Sort(packages)
		packages = slices.Compact(packages)
		return fmt.Errorf("base image: %s not installed (apt-get install %s)", strings.Join(missing, " and "), strings.Join(packages, " "))
	}
	return nil
}
