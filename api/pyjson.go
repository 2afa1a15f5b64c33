package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"

	"github.com/alephvm/alephvm/message"
)

// The reference answers its status routes with Python's json.dumps
// (", " and ": " between items, non-ASCII escaped) or pydantic's compact
// JSON, where a float always shows a fraction ("60.0"). Clients that
// compare answers byte for byte see the same bytes from this node.

// pyFloat marshals as Python writes a float.
type pyFloat float64

func (f pyFloat) MarshalJSON() ([]byte, error) {
	if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
		return nil, fmt.Errorf("%v is not JSON", float64(f))
	}
	return []byte(message.PythonFloat(float64(f))), nil
}

// compactJSON is pydantic's model_dump_json: Go's compact JSON, without
// HTML escaping (pydantic writes UTF-8 as it is).
func compactJSON(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// pythonJSON is json.dumps(v).
func pythonJSON(v any) ([]byte, error) {
	compact, err := compactJSON(v)
	if err != nil {
		return nil, err
	}
	return message.PythonDumps(compact)
}
