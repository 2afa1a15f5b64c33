package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestVMKeyRefusals(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(text), 0o600)
		return p
	}
	good := write("good.key", ownerWalletKey)
	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"missing key file":  {[]string{"--key", filepath.Join(dir, "none"), "--node", "http://127.0.0.1:1"}, "--key"},
		"not hex":           {[]string{"--key", write("bad.key", "hello"), "--node", "http://127.0.0.1:1"}, "want 64 hex digits"},
		"short key":         {[]string{"--key", write("short.key", "0xabcd"), "--node", "http://127.0.0.1:1"}, "want 64 hex digits"},
		"zero key":          {[]string{"--key", write("zero.key", strings.Repeat("0", 64)), "--node", "http://127.0.0.1:1"}, "not a valid secp256k1"},
		"node without host": {[]string{"--key", good, "--node", "nonsense"}, "node URL"},
	} {
		code, _, errOut := runCLI(t, nil, append([]string{"vm", "stop", strings.Repeat("ab", 32)}, tc.args...)...)
		if code == 0 || !strings.Contains(errOut, tc.want) {
			t.Errorf("%s: %d %s", name, code, errOut)
		}
	}
}
