package firecracker

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/alephvm/alephvm/internal/testenv"
)

// schema is the part of a Swagger 2.0 definition the check reads.
type schema struct {
	Ref        string             `yaml:"$ref"`
	Type       string             `yaml:"type"`
	Required   []string           `yaml:"required"`
	Properties map[string]*schema `yaml:"properties"`
	Items      *schema            `yaml:"items"`
	Enum       []any              `yaml:"enum"`
	Minimum    *float64           `yaml:"minimum"`
	Maximum    *float64           `yaml:"maximum"`
}

type apiSpec struct {
	Definitions map[string]*schema                   `yaml:"definitions"`
	Paths       map[string]map[string]*specOperation `yaml:"paths"` // by path, then lower-case method
}

// specOperation is one method of one path.
type specOperation struct {
	Parameters []struct {
		In       string  `yaml:"in"`
		Required bool    `yaml:"required"`
		Schema   *schema `yaml:"schema"`
	} `yaml:"parameters"`
	Responses map[string]struct {
		Schema *schema `yaml:"schema"`
	} `yaml:"responses"`
}

func loadSpec(t *testing.T) *apiSpec {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(testenv.SharedDir(t), "reference", "firecracker", "firecracker-"+Version+"-api.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var s apiSpec
	if err := yaml.Unmarshal(data, &s); err != nil {
		t.Fatal(err)
	}
	return &s
}

// check validates a decoded JSON value against a schema: every property
// known, every required one present, types, enums and bounds right.
func (s *apiSpec) check(path string, sc *schema, v any) []string {
	if sc.Ref != "" {
		name := strings.TrimPrefix(sc.Ref, "#/definitions/")
		def, ok := s.Definitions[name]
		if !ok {
			return []string{fmt.Sprintf("%s: unknown definition %s", path, name)}
		}
		return s.check(path, def, v)
	}
	var errs []string
	fail := func(format string, args ...any) { errs = append(errs, path+": "+fmt.Sprintf(format, args...)) }
	switch sc.Type {
	case "object", "":
		obj, ok := v.(map[string]any)
		if !ok {
			fail("want an object, got %T", v)
			return errs
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			prop, ok := sc.Properties[k]
			if !ok {
				fail("unknown field %q", k)
				continue
			}
			errs = append(errs, s.check(path+"."+k, prop, obj[k])...)
		}
		for _, r := range sc.Required {
			if _, ok := obj[r]; !ok {
				fail("required field %q missing", r)
			}
		}
	case "array":
		list, ok := v.([]any)
		if !ok {
			fail("want an array, got %T", v)
			return errs
		}
		for i, e := range list {
			errs = append(errs, s.check(fmt.Sprintf("%s[%d]", path, i), sc.Items, e)...)
		}
	case "string":
		str, ok := v.(string)
		if !ok {
			fail("want a string, got %T", v)
		} else if len(sc.Enum) > 0 && !slices.ContainsFunc(sc.Enum, func(e any) bool { return fmt.Sprint(e) == str }) {
			fail("%q not in %v", str, sc.Enum)
		}
	case "integer":
		n, ok := v.(float64)
		if !ok || n != float64(int64(n)) {
			fail("want an integer, got %v", v)
		} else {
			if sc.Minimum != nil && n < *sc.Minimum {
				fail("%v below the minimum %v", n, *sc.Minimum)
			}
			if sc.Maximum != nil && n > *sc.Maximum {
				fail("%v above the maximum %v", n, *sc.Maximum)
			}
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			fail("want a boolean, got %T", v)
		}
	default:
		fail("schema type %q not handled by the check", sc.Type)
	}
	return errs
}

// checkAgainstSpec fails the test when data is not a valid
// FullVmConfiguration of Firecracker's API.
func checkAgainstSpec(t *testing.T, spec *apiSpec, data []byte) {
	t.Helper()
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatal(err)
	}
	root, ok := spec.Definitions["FullVmConfiguration"]
	if !ok {
		t.Fatal("no FullVmConfiguration in the spec")
	}
	for _, e := range spec.check("config", root, v) {
		t.Error(e)
	}
}

func TestSpecCheckCatchesMistakes(t *testing.T) {
	spec := loadSpec(t)
	// The spec's own sample passes.
	sample, err := os.ReadFile(filepath.Join(testenv.SharedDir(t), "reference", "firecracker", "vm_config_network.json"))
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	json.Unmarshal(sample, &v)
	stripNulls(v)
	clean, _ := json.Marshal(v)
	checkAgainstSpec(t, spec, clean)
	for _, bad := range []string{
		`{"boot-source":{"kernel_image_path":"k","bootargs":"x"}}`,
		`{"machine-config":{"vcpu_count":0,"mem_size_mib":128}}`,
		`{"machine-config":{"vcpu_count":"2","mem_size_mib":128}}`,
		`{"drives":[{"drive_id":"a","path_on_host":"p","is_read_only":false}]}`,
		`{"drives":[{"drive_id":"a","is_root_device":false,"cache_type":"None"}]}`,
		`{"vsock":{"uds_path":"v.sock"}}`,
	} {
		var v any
		json.Unmarshal([]byte(bad), &v)
		if errs := spec.check("config", spec.Definitions["FullVmConfiguration"], v); len(errs) == 0 {
			t.Errorf("%s passed the check", bad)
		}
	}
}

// stripNulls drops null fields: Firecracker accepts them, the schema has no
// nullable marker.
func stripNulls(v any) {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if e == nil {
				delete(x, k)
			} else {
				stripNulls(e)
			}
		}
	case []any:
		for _, e := range x {
			stripNulls(e)
		}
	}
}
