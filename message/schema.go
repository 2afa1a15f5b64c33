package message

import (
	"encoding/json"
	"fmt"
	"math"
	"math/big"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// This file holds a small schema interpreter. The Aleph message models are
// Pydantic models whose behaviour (lax or strict coercion, extra-key policy,
// defaults, bounds, validators that read sibling fields) must be reproduced
// exactly, and every error must name the JSON path of the offending field.
// Each schema node validates a decoded JSON value (as produced by
// encoding/json with UseNumber) and returns its normalized form: the value
// Python's model_dump(exclude_none=True) would give, with defaults filled in,
// ignored extras dropped and lax inputs coerced. The normalized tree is then
// decoded into the typed Go structs.

// Issue is one validation failure at one place in a message.
type Issue struct {
	Path string // JSON path of the offending field, such as "content.resources.vcpus"
	Msg  string // what was expected and what was found
}

func (i Issue) String() string {
	if i.Path == "" {
		return i.Msg
	}
	return i.Path + ": " + i.Msg
}

// ValidationError lists every problem found in a message.
type ValidationError struct {
	Issues []Issue
}

func (e *ValidationError) Error() string {
	parts := make([]string, len(e.Issues))
	for i, is := range e.Issues {
		parts[i] = is.String()
	}
	return strings.Join(parts, "; ")
}

// path is a JSON path under construction. It is a string because paths are
// short and only built on the way down.
type path string

func (p path) key(k string) path {
	if p == "" {
		return path(k)
	}
	return p + "." + path(k)
}

func (p path) index(i int) path { return p + path("["+strconv.Itoa(i)+"]") }

type checker struct {
	issues []Issue
}

func (c *checker) fail(p path, format string, args ...any) {
	c.issues = append(c.issues, Issue{Path: string(p), Msg: fmt.Sprintf(format, args...)})
}

// failedUnder reports whether an issue was recorded at p or below it since
// the checker held `since` issues.
func (c *checker) failedUnder(p path, since int) bool {
	for _, is := range c.issues[since:] {
		if is.Path == string(p) || strings.HasPrefix(is.Path, string(p)+".") || strings.HasPrefix(is.Path, string(p)+"[") || p == "" {
			return true
		}
	}
	return false
}

func (c *checker) err() error {
	if len(c.issues) == 0 {
		return nil
	}
	return &ValidationError{Issues: c.issues}
}

// typ validates one value and returns its normalized form.
type typ func(c *checker, p path, v any) (out any, ok bool)

// describe names a decoded JSON value's kind for error messages.
func describe(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return strconv.FormatBool(x)
	case json.Number:
		return "number " + truncate(string(x), 40)
	case string:
		return "string " + strconv.Quote(truncate(x, 60))
	case []any:
		return "list"
	case map[string]any:
		return "object"
	default:
		return fmt.Sprintf("%T", v)
	}
}

func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n]) + "…"
}

// ---- scalars ----

func strType(maxLen int) typ {
	return func(c *checker, p path, v any) (any, bool) {
		s, ok := v.(string)
		if !ok {
			c.fail(p, "must be a string, got %s", describe(v))
			return nil, false
		}
		if maxLen > 0 {
			if n := utf8.RuneCountInString(s); n > maxLen {
				c.fail(p, "must be at most %d characters, got %d", maxLen, n)
				return nil, false
			}
		}
		return s, true
	}
}

var anyString = strType(0)

func enumType(values ...string) typ {
	return func(c *checker, p path, v any) (any, bool) {
		s, ok := v.(string)
		if !ok || !slices.Contains(values, s) {
			quoted := make([]string, len(values))
			for i, x := range values {
				quoted[i] = strconv.Quote(x)
			}
			c.fail(p, "must be one of %s, got %s", strings.Join(quoted, ", "), describe(v))
			return nil, false
		}
		return s, true
	}
}

func literalString(want string) typ {
	return func(c *checker, p path, v any) (any, bool) {
		if s, ok := v.(string); !ok || s != want {
			c.fail(p, "must be %q, got %s", want, describe(v))
			return nil, false
		}
		return want, true
	}
}

var truthyStrings = map[string]bool{
	"0": false, "off": false, "f": false, "false": false, "n": false, "no": false,
	"1": true, "on": true, "t": true, "true": true, "y": true, "yes": true,
}

// boolType accepts what Pydantic's lax bool accepts.
func boolType(c *checker, p path, v any) (any, bool) {
	switch x := v.(type) {
	case bool:
		return x, true
	case json.Number:
		if f, err := strconv.ParseFloat(string(x), 64); err == nil && (f == 0 || f == 1) {
			return f == 1, true
		}
	case string:
		if b, ok := truthyStrings[strings.ToLower(x)]; ok {
			return b, true
		}
	}
	c.fail(p, "must be a boolean, got %s", describe(v))
	return nil, false
}

// isIntLiteral reports whether a JSON number is written as an integer.
func isIntLiteral(n string) bool { return !strings.ContainsAny(n, ".eE") }

var decimalZeros = regexp.MustCompile(`^([+-]?[0-9]+)\.0*$`)

// intBounds holds inclusive bounds of an integer field. Every integer is
// also kept within int64 so that it fits the Go structs.
type intBounds struct {
	min, max int64
	strict   bool // only a JSON integer literal is accepted (Pydantic strict=True)
}

var int64Range = intBounds{min: math.MinInt64, max: math.MaxInt64}

func intType(b intBounds) typ {
	return func(c *checker, p path, v any) (any, bool) {
		n, ok := toBigInt(v, b.strict)
		if !ok {
			c.fail(p, "must be an integer, got %s", describe(v))
			return nil, false
		}
		if n.Cmp(big.NewInt(b.min)) < 0 || n.Cmp(big.NewInt(b.max)) > 0 {
			switch {
			case b.max == math.MaxInt64 && b.min == math.MinInt64:
				c.fail(p, "must fit in 64 bits, got %s", truncate(n.String(), 40))
			case b.max == math.MaxInt64:
				c.fail(p, "must be at least %d, got %s", b.min, truncate(n.String(), 40))
			default:
				c.fail(p, "must be between %d and %d, got %s", b.min, b.max, truncate(n.String(), 40))
			}
			return nil, false
		}
		return json.Number(n.String()), true
	}
}

// toBigInt converts a value to an integer the way Pydantic's int does:
// strict accepts only integer literals; lax also accepts integral floats,
// numeric strings and booleans.
func toBigInt(v any, strict bool) (*big.Int, bool) {
	switch x := v.(type) {
	case json.Number:
		s := string(x)
		if isIntLiteral(s) {
			n, ok := new(big.Int).SetString(s, 10)
			return n, ok
		}
		if strict {
			return nil, false
		}
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || math.IsInf(f, 0) || f != math.Trunc(f) {
			return nil, false
		}
		n, _ := big.NewFloat(f).Int(nil)
		return n, true
	case bool:
		if strict {
			return nil, false
		}
		if x {
			return big.NewInt(1), true
		}
		return big.NewInt(0), true
	case string:
		if strict {
			return nil, false
		}
		s := strings.TrimSpace(x)
		if m := decimalZeros.FindStringSubmatch(s); m != nil {
			s = m[1]
		}
		n, ok := new(big.Int).SetString(s, 10)
		return n, ok
	}
	return nil, false
}

// floatType accepts what Pydantic's lax float accepts, within [min, max].
func floatType(min, max float64) typ {
	return func(c *checker, p path, v any) (any, bool) {
		var f float64
		var err error
		switch x := v.(type) {
		case json.Number:
			f, err = strconv.ParseFloat(string(x), 64)
		case string:
			f, err = strconv.ParseFloat(strings.TrimSpace(x), 64)
		case bool:
			if x {
				f = 1
			}
		default:
			err = strconv.ErrSyntax
		}
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			c.fail(p, "must be a finite number, got %s", describe(v))
			return nil, false
		}
		if f < min || f > max {
			c.fail(p, "must be between %s and %s, got %s", fmtFloat(min), fmtFloat(max), fmtFloat(f))
			return nil, false
		}
		return f, true
	}
}

func fmtFloat(f float64) string { return strconv.FormatFloat(f, 'f', -1, 64) }

var anyFloat = floatType(-math.MaxFloat64, math.MaxFloat64)

func itemHashType(c *checker, p path, v any) (any, bool) {
	s, ok := v.(string)
	if !ok {
		c.fail(p, "must be an item hash string, got %s", describe(v))
		return nil, false
	}
	if _, err := ParseItemHash(s); err != nil {
		c.fail(p, "%v", err)
		return nil, false
	}
	return s, true
}

// anyType accepts any JSON value and keeps it as it is.
func anyType(_ *checker, _ path, v any) (any, bool) { return v, true }

// objectOf accepts any JSON object (a Python Dict).
func objectOf(maxEntries int) typ {
	return func(c *checker, p path, v any) (any, bool) {
		m, ok := v.(map[string]any)
		if !ok {
			c.fail(p, "must be an object, got %s", describe(v))
			return nil, false
		}
		if maxEntries > 0 && len(m) > maxEntries {
			c.fail(p, "must have at most %d entries, got %d", maxEntries, len(m))
			return nil, false
		}
		return m, true
	}
}

// ---- containers ----

func listType(elem typ, maxLen int) typ {
	return func(c *checker, p path, v any) (any, bool) {
		l, ok := v.([]any)
		if !ok {
			c.fail(p, "must be a list, got %s", describe(v))
			return nil, false
		}
		if maxLen > 0 && len(l) > maxLen {
			c.fail(p, "must have at most %d items, got %d", maxLen, len(l))
			return nil, false
		}
		out := make([]any, len(l))
		good := true
		for i, e := range l {
			o, ok := elem(c, p.index(i), e)
			good = good && ok
			out[i] = o
		}
		return out, good
	}
}

// dictType validates a JSON object used as a map with typed keys and values.
func dictType(key, val typ, maxEntries int) typ {
	return func(c *checker, p path, v any) (any, bool) {
		m, ok := v.(map[string]any)
		if !ok {
			c.fail(p, "must be an object, got %s", describe(v))
			return nil, false
		}
		if maxEntries > 0 && len(m) > maxEntries {
			c.fail(p, "must have at most %d entries, got %d", maxEntries, len(m))
			return nil, false
		}
		out := make(map[string]any, len(m))
		good := true
		for _, k := range sortedKeys(m) {
			if _, ok := key(c, p.key(k), k); !ok {
				good = false
				continue
			}
			o, ok := val(c, p.key(k), m[k])
			good = good && ok
			out[k] = o
		}
		return out, good
	}
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// ---- objects (Pydantic models) ----

type extraPolicy int

const (
	extraIgnore extraPolicy = iota // Pydantic's default: unknown keys are dropped
	extraForbid                    // unknown keys are errors
	extraAllow                     // unknown keys are kept
)

type field struct {
	key      string
	t        typ
	required bool // the key must be present
	nullable bool // null is accepted (and then left out of the normalized form)
	def      any  // normalized default used when the key is absent; nil for none
	// check runs after t succeeded, with the fields validated so far; it
	// reproduces Pydantic field validators that read earlier fields, and
	// returns the value to keep.
	check func(c *checker, p path, v any, siblings map[string]any) (any, bool)
}

type model struct {
	name     string
	fields   []field
	extra    extraPolicy
	maxExtra int // with extraAllow, how many extra keys are accepted (0: any)
	// after reproduces a Pydantic model validator: it runs only when every
	// field of the model validated.
	after func(c *checker, p path, obj map[string]any)
}

func (m *model) validate(c *checker, p path, v any) (any, bool) {
	in, ok := v.(map[string]any)
	if !ok {
		c.fail(p, "must be an object, got %s", describe(v))
		return nil, false
	}
	since := len(c.issues)
	out := make(map[string]any, len(m.fields))
	known := make(map[string]bool, len(m.fields))
	for _, f := range m.fields {
		known[f.key] = true
		fp := p.key(f.key)
		raw, present := in[f.key]
		switch {
		case !present && f.required:
			c.fail(fp, "field required")
			continue
		case !present:
			if f.def != nil {
				out[f.key] = cloneDefault(f.def)
			}
			continue
		case raw == nil && f.nullable:
			continue
		}
		norm, ok := f.t(c, fp, raw)
		if !ok {
			continue
		}
		if f.check != nil {
			if norm, ok = f.check(c, fp, norm, out); !ok {
				continue
			}
		}
		if norm != nil {
			out[f.key] = norm
		}
	}
	extras := 0
	for _, k := range sortedKeys(in) {
		if known[k] {
			continue
		}
		switch m.extra {
		case extraForbid:
			c.fail(p.key(k), "unknown field")
		case extraAllow:
			extras++
			if in[k] != nil {
				out[k] = in[k]
			}
		}
	}
	if m.maxExtra > 0 && extras > m.maxExtra {
		c.fail(p, "has %d entries, at most %d are allowed", extras, m.maxExtra)
	}
	if c.failedUnder(p, since) {
		return nil, false
	}
	if m.after != nil {
		m.after(c, p, out)
		if c.failedUnder(p, since) {
			return nil, false
		}
	}
	return out, true
}

func (m *model) typ() typ { return m.validate }

// cloneDefault copies a default so that normalized trees never share state.
func cloneDefault(v any) any {
	switch x := v.(type) {
	case []any:
		return slices.Clone(x)
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = cloneDefault(e)
		}
		return out
	}
	return v
}
