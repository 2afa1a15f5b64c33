package message

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// FuzzParse feeds the parser arbitrary bytes, seeded with the reference
// fixtures as received and regenerated: it must never panic or hang, and
// Regenerate must be idempotent and give JSON the parser can read.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"type":"POST","item_type":"inline","item_content":"{}","content":{}}`))
	f.Add([]byte(`{"content":{"volumes":[{"size_mib":1001}]}}`))
	if dir, ok := testenv.FindSharedDir(); ok {
		files, _ := filepath.Glob(filepath.Join(dir, "fixtures", "aleph-message", "*.json"))
		for _, file := range files {
			data, err := os.ReadFile(file)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data)
			if out, err := Regenerate(data); err == nil {
				f.Add(out)
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		msg, err := Parse(data)
		if err == nil && (msg.Content == nil || msg.Content.MessageType() != msg.Type) {
			t.Fatalf("valid message without matching content: %+v", msg)
		}
		out, err := Regenerate(data)
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("Regenerate gave invalid JSON: %s", out)
		}
		again, err := Regenerate(out)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("Regenerate is not idempotent: %v\n%s\n%s", err, out, again)
		}
		_, _ = Parse(out)
	})
}
