package reactor

import (
	"encoding/json"
	"testing"
)

func TestMatches(t *testing.T) {
	msg := map[string]any{}
	json.Unmarshal([]byte(`{"type":"POST","channel":"TEST","sender":"0xabc","content":{"type":"test","address":"0xabc","content":{"x":1}}}`), &msg)
	for _, tc := range []struct {
		sub  string
		want bool
	}{
		{`{"channel":"TEST"}`, true},
		{`{"channel":"TEST","sender":"0xabc"}`, true},
		{`{"channel":"OTHER"}`, false},
		{`{"content":{"type":"test"}}`, true},
		{`{"content":{"type":"other"}}`, false},
		{`{"content":{"missing":"x"}}`, false},
		{`{"nope":"x"}`, false},
		{`{}`, false},
		{`{"content":{"content":{"x":1}}}`, false}, // numbers never match
		{`{"channel":["TEST"]}`, false},
		{`{"channel":null}`, false},
		{`{"content":"test"}`, false},
	} {
		sub := map[string]any{}
		if err := json.Unmarshal([]byte(tc.sub), &sub); err != nil {
			t.Fatal(err)
		}
		if got := Matches(sub, msg); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.sub, got, tc.want)
		}
	}
}
