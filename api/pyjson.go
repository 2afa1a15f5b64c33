package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"unicode/utf16"
)

// The reference answers its status routes with Python's json.dumps
// (", " and ": " between items, non-ASCII escaped) or pydantic's compact
// JSON, where a float always shows a fraction ("60.0"). Clients that
// compare answers byte for byte see the same bytes from this node.

// pyFloat marshals as Python writes a float.
type pyFloat float64

func (f pyFloat) MarshalJSON() ([]byte, error) {
	v := float64(f)
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil, fmt.Errorf("%v is not JSON", v)
	}
	s := strconv.FormatFloat(v, 'f', -1, 64)
	if v == math.Trunc(v) && math.Abs(v) < 1e16 {
		s = strconv.FormatFloat(v, 'f', 1, 64)
	}
	return []byte(s), nil
}

// compactJSON is pydantic's model_dump_json: Go's compact JSON, without
// HTML escaping.
func compactJSON(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// pythonJSON is json.dumps(v): items separated by ", " and ": ", every
// non-ASCII character escaped.
func pythonJSON(v any) ([]byte, error) {
	compact, err := compactJSON(v)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	inString, escaped := false, false
	for _, r := range string(compact) {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case r == '\\':
				escaped = true
			case r == '"':
				inString = false
			}
			if r > 0x7e {
				for _, u := range utf16.Encode([]rune{r}) {
					fmt.Fprintf(&out, `\u%04x`, u)
				}
				continue
			}
			out.WriteRune(r)
		case r == '"':
			inString = true
			out.WriteRune(r)
		case r == ',':
			out.WriteString(", ")
		case r == ':':
			out.WriteString(": ")
		default:
			out.WriteRune(r)
		}
	}
	return out.Bytes(), nil
}
