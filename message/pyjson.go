package message

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"strconv"
	"strings"
	"unicode/utf16"
)

// This file reproduces the two pieces of Python's json module that the
// reference's hashes depend on: json.dumps(obj, separators=(",", ":")) with
// its defaults (ensure_ascii, insertion order, float repr), and Python's ==
// between the decoded values (1 == 1.0 == True).

// orderedObject is a JSON object that keeps its keys in document order, as a
// Python dict from json.loads does. A repeated key keeps its first position
// and its last value, as in Python.
type orderedObject struct {
	keys []string
	vals map[string]any
}

// decodeOrdered reads one JSON value keeping object key order. Values are
// orderedObject, []any, string, json.Number, bool or nil.
func decodeOrdered(data []byte) (any, error) {
	if err := checkShape(data); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	v, err := readOrdered(dec)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("invalid JSON: data after the top-level value")
	}
	return v, nil
}

func readOrdered(dec *json.Decoder) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			obj := orderedObject{vals: map[string]any{}}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, fmt.Errorf("invalid JSON: %w", err)
				}
				k := kt.(string)
				v, err := readOrdered(dec)
				if err != nil {
					return nil, err
				}
				if _, seen := obj.vals[k]; !seen {
					obj.keys = append(obj.keys, k)
				}
				obj.vals[k] = v
			}
			_, err := dec.Token() // '}'
			return obj, err
		case '[':
			list := []any{}
			for dec.More() {
				v, err := readOrdered(dec)
				if err != nil {
					return nil, err
				}
				list = append(list, v)
			}
			_, err := dec.Token() // ']'
			return list, err
		}
		return nil, fmt.Errorf("invalid JSON: unexpected %v", t)
	default:
		return tok, nil
	}
}

// MaxDepth bounds the nesting of a message's JSON. Python's json module
// gives up near its recursion limit of 1000, so no message the reference
// can read is deeper.
const MaxDepth = 1000

// MaxValues bounds the values (objects, arrays, members, elements) of a
// message's JSON. The largest message of the reference's fixtures has
// fewer than a hundred; within MaxMessageSize, two million small values
// cost decoding, validating and typing them about 400 MiB of allocations,
// 100 MiB of them live at once.
const MaxValues = 100_000

// checkShape refuses JSON nested deeper than MaxDepth, or holding more
// than MaxValues values, before any decoder builds a tree of it.
func checkShape(data []byte) error {
	// Each container and each separator starts a value (a container's
	// first comes with it): values counts them.
	depth, values, inString, escaped := 0, 0, false, false
	for _, b := range data {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case b == '\\':
				escaped = true
			case b == '"':
				inString = false
			}
		case b == '"':
			inString = true
		case b == '{' || b == '[':
			depth++
			values++
			if depth > MaxDepth {
				return fmt.Errorf("invalid JSON: nested deeper than %d levels", MaxDepth)
			}
		case b == '}' || b == ']':
			depth--
		case b == ',':
			values++
		}
		if values > MaxValues {
			return fmt.Errorf("invalid JSON: more than %d values", MaxValues)
		}
	}
	return nil
}

// pyDumps serializes a value from decodeOrdered exactly as Python's
// json.dumps(value, separators=(",", ":")) does.
func pyDumps(v any) (string, error) {
	var b strings.Builder
	if err := writePy(&b, v, compactSeparators); err != nil {
		return "", err
	}
	return b.String(), nil
}

// separators are json.dumps's item and key separators.
type separators struct{ item, key string }

var (
	compactSeparators = separators{",", ":"}
	defaultSeparators = separators{", ", ": "} // json.dumps's defaults
)

// PythonDumps writes JSON data again as Python's json.dumps(json.loads(data))
// does, keys in their order: its default separators (", " and ": "),
// non-ASCII characters escaped, numbers as Python prints them. Answers
// that clients compare with the reference node's, byte for byte, are
// written with it.
func PythonDumps(data []byte) ([]byte, error) {
	v, err := decodeOrdered(data)
	if err != nil {
		return nil, err
	}
	var b strings.Builder
	if err := writePy(&b, v, defaultSeparators); err != nil {
		return nil, err
	}
	return []byte(b.String()), nil
}

// PythonFloat is the text Python's repr gives a float: with a fraction or
// an exponent, never a bare integer.
func PythonFloat(f float64) string { return pyFloatRepr(f) }

func writePy(b *strings.Builder, v any, sep separators) error {
	switch x := v.(type) {
	case nil:
		b.WriteString("null")
	case bool:
		b.WriteString(strconv.FormatBool(x))
	case string:
		writePyString(b, x)
	case json.Number:
		s, err := pyNumber(string(x))
		if err != nil {
			return err
		}
		b.WriteString(s)
	case []any:
		b.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				b.WriteString(sep.item)
			}
			if err := writePy(b, e, sep); err != nil {
				return err
			}
		}
		b.WriteByte(']')
	case orderedObject:
		b.WriteByte('{')
		for i, k := range x.keys {
			if i > 0 {
				b.WriteString(sep.item)
			}
			writePyString(b, k)
			b.WriteString(sep.key)
			if err := writePy(b, x.vals[k], sep); err != nil {
				return err
			}
		}
		b.WriteByte('}')
	default:
		return fmt.Errorf("cannot serialize %T", v)
	}
	return nil
}

// writePyString writes s as Python's json.dumps does with ensure_ascii:
// every character outside printable ASCII is a \uXXXX escape (lowercase hex,
// surrogate pairs above the BMP).
func writePyString(b *strings.Builder, s string) {
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		default:
			switch {
			case r >= 0x20 && r <= 0x7e:
				b.WriteRune(r)
			case r > 0xffff:
				r1, r2 := utf16.EncodeRune(r)
				fmt.Fprintf(b, `\u%04x\u%04x`, r1, r2)
			default:
				fmt.Fprintf(b, `\u%04x`, r)
			}
		}
	}
	b.WriteByte('"')
}

// pyNumber formats a JSON number literal as Python prints the value
// json.loads makes of it: integers as integers, everything else as a float
// repr ("1.0", "1e+16", "1.5e-05").
func pyNumber(lit string) (string, error) {
	if isIntLiteral(lit) {
		n, ok := new(big.Int).SetString(lit, 10)
		if !ok {
			return "", fmt.Errorf("invalid number %q", lit)
		}
		return n.String(), nil
	}
	f, err := strconv.ParseFloat(lit, 64)
	if err != nil || math.IsInf(f, 0) {
		return "", fmt.Errorf("number %q is out of range", truncate(lit, 40))
	}
	return pyFloatRepr(f), nil
}

func pyFloatRepr(f float64) string {
	abs := math.Abs(f)
	if abs != 0 && (abs < 1e-4 || abs >= 1e16) {
		return strconv.FormatFloat(f, 'e', -1, 64)
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// pyEqual compares two decoded JSON values as Python's == compares the
// objects json.loads and model_dump give: numbers and booleans by value
// (1 == 1.0 == True), objects regardless of key order.
func pyEqual(a, b any) bool {
	if na, ok := pyNumeric(a); ok {
		nb, ok := pyNumeric(b)
		return ok && na.Cmp(nb) == 0
	}
	switch x := a.(type) {
	case nil:
		return b == nil
	case string:
		y, ok := b.(string)
		return ok && x == y
	case []any:
		y, ok := b.([]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for i := range x {
			if !pyEqual(x[i], y[i]) {
				return false
			}
		}
		return true
	case map[string]any:
		y, ok := b.(map[string]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for k, xv := range x {
			yv, ok := y[k]
			if !ok || !pyEqual(xv, yv) {
				return false
			}
		}
		return true
	}
	return false
}

// pyNumeric returns the exact value of a number or boolean.
func pyNumeric(v any) (*big.Float, bool) {
	switch x := v.(type) {
	case bool:
		if x {
			return big.NewFloat(1), true
		}
		return big.NewFloat(0), true
	case float64:
		return big.NewFloat(x), true
	case json.Number:
		if isIntLiteral(string(x)) {
			n, ok := new(big.Int).SetString(string(x), 10)
			if !ok {
				return nil, false
			}
			return new(big.Float).SetInt(n), true
		}
		f, err := strconv.ParseFloat(string(x), 64)
		if err != nil {
			return nil, false
		}
		return big.NewFloat(f), true
	}
	return nil, false
}
