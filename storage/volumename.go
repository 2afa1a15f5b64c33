package storage

import (
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"strings"
)

// maxVolumeName bounds VolumeFileName's answer, well inside the 255 bytes
// of a file name with the callers' prefixes and suffixes.
const maxVolumeName = 200

// VolumeFileName is the file-name form of the name of a VM's volume
// number index, one to one: distinct volumes never share a file. A name of
// letters, digits, '_' and '-' is kept as it is (so volumes made before
// keep their files); any other byte is escaped as %XX (so "a b" is
// "a%20b" and "a_b" stays "a_b"); a form longer than 200 bytes is cut to
// a readable prefix followed by '~' and the sha256 of the name; an
// unnamed volume (empty name) is "unnamed.<index>". The forms cannot
// meet: only escaped names hold '%' without '~', only cut names hold '~',
// and only unnamed ones hold '.'.
func VolumeFileName(name string, index int) string {
	if name == "" {
		return "unnamed." + strconv.Itoa(index)
	}
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		c := name[i]
		if isSafe(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteString(strings.ToUpper(hex.EncodeToString([]byte{c})))
	}
	out := b.String()
	if len(out) <= maxVolumeName {
		return out
	}
	prefix := out[:maxVolumeName-1-2*sha256.Size]
	// Cut before a partial escape, for a readable prefix.
	if i := strings.LastIndexByte(prefix, '%'); i >= len(prefix)-2 {
		prefix = prefix[:i]
	}
	sum := sha256.Sum256([]byte(name))
	return prefix + "~" + hex.EncodeToString(sum[:])
}

func isSafe(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}
