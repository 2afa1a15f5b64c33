package message

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// The conformance suite of aleph-message 1.1.1: every fixture of the
// reference library's tests and every mutation its tests apply to them
// (shared/reference/aleph-message.md §5).

func fixtureDir(t testing.TB) string {
	return filepath.Join(testenv.SharedDir(t), "fixtures", "aleph-message")
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtureDir(t), name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// loadFixture decodes a fixture into a mutable map, numbers kept as written.
func loadFixture(t testing.TB, name string) map[string]any {
	t.Helper()
	return decodeMap(t, readFixture(t, name))
}

func decodeMap(t testing.TB, data []byte) map[string]any {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

// regenerated does what the reference's create_new_message does: sets
// item_content and item_hash from content, then parses.
func regenerated(t testing.TB, doc map[string]any) (*Message, error) {
	t.Helper()
	data, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	out, err := Regenerate(data)
	if err != nil {
		t.Fatalf("regenerate: %v", err)
	}
	return Parse(out)
}

// at walks a path of keys into a decoded message.
func at(doc map[string]any, keys ...string) map[string]any {
	m := doc
	for _, k := range keys {
		m = m[k].(map[string]any)
	}
	return m
}

// issueAt returns the issue at path, failing the test when err is not a
// validation error holding one.
func issueAt(t *testing.T, err error, path string) Issue {
	t.Helper()
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("want a validation error at %s, got %v", path, err)
	}
	for _, is := range verr.Issues {
		if is.Path == path {
			return is
		}
	}
	t.Fatalf("want an issue at %s, got %v", path, err)
	return Issue{}
}

var fixtureNames = []string{
	"forget", "instance_confidential_machine", "instance_content", "instance_gpu_machine",
	"instance_machine", "machine", "machine_named",
}

func TestFixturesRegenerated(t *testing.T) {
	// The sha256 of each fixture's content serialized as Python's
	// json.dumps(content, separators=(",", ":")) does.
	wantHash := map[string]string{
		"forget":                        "e0c2de6f48832cf68502512316088b69eebba9e4443dc47dee45740791be7c7d",
		"instance_confidential_machine": "d565f8d10a3d62dd36feea428ac1a5db27fed4f32013258ed82afa7842ccc7cd",
		"instance_content":              "fff662825814094b1e3e9af2b43896f1f0f5a1b36dbf92dbee5572bc29855aa2",
		"instance_gpu_machine":          "cc96b1b00e221ef359c786aaa70e9a47bf28dee1573110903bf9f2aa1c0d1511",
		"instance_machine":              "e80199452c1af282bd90c8f49de04b215f99bdc00360e0c534fff26a00bfab3a",
		"machine":                       "7709affb0e042034b0723cd6967252f07eb0a45f7d849c888de3ba9cb4396c14",
		"machine_named":                 "2a27884d11fe16efdacf22a6a0e41ba0454ff598bb8fcbcbead5a6b306f8851c",
	}
	entries, err := os.ReadDir(fixtureDir(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(fixtureNames) {
		t.Errorf("shared fixtures hold %d files, the suite knows %d: add the new ones here", len(entries), len(fixtureNames))
	}
	for _, name := range fixtureNames {
		t.Run(name, func(t *testing.T) {
			out, err := Regenerate(readFixture(t, name))
			if err != nil {
				t.Fatal(err)
			}
			msg, err := Parse(out)
			if err != nil {
				t.Fatalf("regenerated fixture is invalid: %v", err)
			}
			if string(msg.ItemHash) != wantHash[name] {
				t.Errorf("item_hash = %s, want %s", msg.ItemHash, wantHash[name])
			}
			if msg.Content.MessageType() != msg.Type {
				t.Errorf("content type %s for a %s message", msg.Content.MessageType(), msg.Type)
			}
		})
	}
}

func TestFixturesAsReceived(t *testing.T) {
	// instance_content.json is a real message: valid as it is, with the
	// hash of its item_content, which differs from its content field.
	msg, err := Parse(readFixture(t, "instance_content"))
	if err != nil {
		t.Fatalf("instance_content as received: %v", err)
	}
	if msg.ItemHash != "b28fa9a9ede14c9bbd6fde8959be07cfd25a3358d08e01405301adc5a1a2b2c8" {
		t.Errorf("item_hash = %s", msg.ItemHash)
	}
	inst := msg.Content.(*InstanceContent)
	// The content comes from the signed item_content, which has no T&C.
	if inst.Requirements.Node.TermsAndConditions != nil {
		t.Errorf("content was not taken from item_content")
	}
	if got := msg.Time.Format("2006-01-02T15:04:05.000000Z07:00"); got != "2024-11-20T16:02:43.214390Z" {
		t.Errorf("time = %s", got)
	}
	// The other fixtures carry no item_content or item_hash.
	for _, name := range fixtureNames {
		if name == "instance_content" {
			continue
		}
		_, err := Parse(readFixture(t, name))
		issueAt(t, err, "item_hash")
	}
}

func TestReferenceMutations(t *testing.T) {
	type mutation struct {
		name    string
		fixture string
		mutate  func(doc map[string]any)
		path    string // "" when the result is valid
		msg     string // a substring of the expected message
	}
	setPayment := func(typ string, receiverNull bool) func(map[string]any) {
		return func(doc map[string]any) {
			at(doc, "content", "payment")["type"] = typ
			if receiverNull {
				at(doc, "content", "payment")["receiver"] = nil
			}
		}
	}
	seq := func(fs ...func(map[string]any)) func(map[string]any) {
		return func(doc map[string]any) {
			for _, f := range fs {
				f(doc)
			}
		}
	}
	setReq := func(key string, v any) func(map[string]any) {
		return func(doc map[string]any) { at(doc, "content", "requirements")[key] = v }
	}
	setHypervisor := func(h string) func(map[string]any) {
		return func(doc map[string]any) { at(doc, "content", "environment")["hypervisor"] = h }
	}
	const nodeHash = "content.requirements.node.node_hash"
	cases := []mutation{
		{"tee needs qemu", "instance_confidential_machine", setHypervisor("firecracker"),
			"content.environment.trusted_execution", "Trusted Execution Environment is only supported for QEmu"},

		{"gpu hold without receiver", "instance_gpu_machine", setPayment("hold", true), "", ""},
		{"gpu hold without node", "instance_gpu_machine", seq(setPayment("hold", true), setReq("node", nil)),
			nodeHash, "Node hash assignment is needed for GPU support"},
		{"gpu on firecracker", "instance_gpu_machine", setHypervisor("firecracker"),
			"content.environment.hypervisor", "GPU option is only supported for QEmu hypervisor"},
		{"payg without gpu", "instance_gpu_machine", setReq("gpu", nil), "", ""},
		{"payg without gpu or node", "instance_gpu_machine", seq(setReq("gpu", nil), setReq("node", nil)),
			nodeHash, "Node hash assignment is needed for PAYG or Credit payments"},
		{"credit with gpu", "instance_gpu_machine", setPayment("credit", true), "", ""},
		{"credit without gpu", "instance_gpu_machine", seq(setPayment("credit", true), setReq("gpu", nil)), "", ""},
		{"credit without gpu or node", "instance_gpu_machine",
			seq(setPayment("credit", true), setReq("gpu", nil), setReq("node", nil)),
			nodeHash, "Node hash assignment is needed for PAYG or Credit payments"},

		{"t&c with superfluid", "instance_content", setPayment("superfluid", false), "", ""},
		{"t&c with credit", "instance_content", setPayment("credit", false), "", ""},
		{"t&c with hold", "instance_content", setPayment("hold", false),
			"content.requirements.node.terms_and_conditions", "Only PAYG/CoCo/Credit instances can have a terms_and_conditions"},
		{"t&c without node_hash", "instance_content", seq(setPayment("superfluid", false), func(doc map[string]any) {
			delete(at(doc, "content", "requirements", "node"), "node_hash")
		}), nodeHash, "Node hash assignment is needed for PAYG or Credit payments"},

		{"forget forgotten", "forget", func(doc map[string]any) { doc["forgotten_by"] = []any{"abcde"} },
			"forgotten_by", "This type of message may not be forgotten"},
		{"program forgotten_by null", "machine", func(doc map[string]any) { doc["forgotten_by"] = nil }, "", ""},
		{"program forgotten_by one", "machine", func(doc map[string]any) { doc["forgotten_by"] = []any{"abcde"} }, "", ""},
		{"program forgotten_by two", "machine", func(doc map[string]any) { doc["forgotten_by"] = []any{"abcde", "fghij"} }, "", ""},
	}

	// Boundary tests on instance_machine.json: the value at the cap passes,
	// one above fails.
	boundary := func(name, path string, build func(n int) any, limit int, set func(doc map[string]any, v any)) {
		cases = append(cases,
			mutation{name + " at cap", "instance_machine", func(doc map[string]any) { set(doc, build(limit)) }, "", ""},
			mutation{name + " above cap", "instance_machine", func(doc map[string]any) { set(doc, build(limit+1)) }, path, ""},
		)
	}
	setContent := func(key string) func(map[string]any, any) {
		return func(doc map[string]any, v any) { at(doc, "content")[key] = v }
	}
	entries := func(value func(i int) any) func(int) any {
		return func(n int) any {
			m := map[string]any{}
			for i := range n {
				m[strconv.Itoa(i)] = value(i)
			}
			return m
		}
	}
	repeat := func(v any) func(int) any {
		return func(n int) any {
			l := make([]any, n)
			for i := range l {
				l[i] = v
			}
			return l
		}
	}
	boundary("metadata entries", "content.metadata", entries(func(i int) any { return i }), MaxMetadataEntries, setContent("metadata"))
	boundary("authorized_keys count", "content.authorized_keys", repeat("key"), MaxAuthorizedKeys, setContent("authorized_keys"))
	boundary("authorized_key length", "content.authorized_keys[0]", func(n int) any { return []any{strings.Repeat("a", n)} },
		MaxAuthorizedKeyLength, setContent("authorized_keys"))
	boundary("variables entries", "content.variables", entries(func(i int) any { return strconv.Itoa(i) }), MaxVariableEntries, setContent("variables"))
	boundary("variable key length", "content.variables."+strings.Repeat("a", MaxVariableKeyLength+1),
		func(n int) any { return map[string]any{strings.Repeat("a", n): "v"} }, MaxVariableKeyLength, setContent("variables"))
	boundary("variable value length", "content.variables.k", func(n int) any { return map[string]any{"k": strings.Repeat("v", n)} },
		MaxVariableValueLength, setContent("variables"))
	boundary("volumes count", "content.volumes", repeat(map[string]any{"ephemeral": true, "mount": "/tmp/a", "size_mib": 1}),
		MaxVolumes, setContent("volumes"))
	boundary("replaces length", "content.replaces", func(n int) any { return strings.Repeat("x", n) }, MaxReplacesLength, setContent("replaces"))
	boundary("volume label length", "content.volumes[0].comment",
		func(n int) any {
			return []any{map[string]any{"ephemeral": true, "mount": "/tmp/a", "size_mib": 1, "comment": strings.Repeat("c", n)}}
		}, MaxVolumeLabelLength, setContent("volumes"))
	boundary("address_regex length", "content.requirements.node.address_regex",
		func(n int) any {
			return map[string]any{"node": map[string]any{"address_regex": strings.Repeat("a", n)}}
		},
		MaxAddressRegexLength, setContent("requirements"))

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			doc := loadFixture(t, tc.fixture)
			tc.mutate(doc)
			_, err := regenerated(t, doc)
			if tc.path == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			is := issueAt(t, err, tc.path)
			if !strings.Contains(is.Msg, tc.msg) {
				t.Errorf("issue = %q, want it to contain %q", is.Msg, tc.msg)
			}
		})
	}
}

func TestProgramContentMustMatchItemContent(t *testing.T) {
	out, err := Regenerate(readFixture(t, "machine"))
	if err != nil {
		t.Fatal(err)
	}
	doc := decodeMap(t, out)
	at(doc, "content")["replaces"] = "does-not-exist"
	data, _ := json.Marshal(doc)
	_, err = Parse(data)
	if is := issueAt(t, err, "content"); is.Msg != "Content and item_content differ" {
		t.Errorf("issue = %q", is.Msg)
	}

	// INSTANCE has no such rule: a differing content is accepted.
	out, _ = Regenerate(readFixture(t, "instance_machine"))
	doc = decodeMap(t, out)
	at(doc, "content")["replaces"] = "something else"
	data, _ = json.Marshal(doc)
	if _, err := Parse(data); err != nil {
		t.Errorf("instance with differing content: %v", err)
	}
}

func TestProgramItemContentNeedsDefaults(t *testing.T) {
	// The reference compares model_dump(exclude_none=True) with the parsed
	// item_content, so an item_content that leaves out a defaulted field or
	// writes an explicit null is refused, whatever the hash.
	for _, tc := range []struct {
		name   string
		mutate func(content map[string]any)
	}{
		{"no volumes", func(c map[string]any) { delete(c, "volumes") }},
		{"no code.use_latest", func(c map[string]any) { delete(c["code"].(map[string]any), "use_latest") }},
		{"no environment booleans", func(c map[string]any) { c["environment"] = map[string]any{} }},
		{"explicit published_ports null", func(c map[string]any) { c["resources"].(map[string]any)["published_ports"] = nil }},
		{"explicit on.persistent null", func(c map[string]any) { c["on"].(map[string]any)["persistent"] = nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc := loadFixture(t, "machine")
			tc.mutate(at(doc, "content"))
			_, err := regenerated(t, doc)
			if is := issueAt(t, err, "content"); is.Msg != "Content and item_content differ" {
				t.Errorf("issue = %q", is.Msg)
			}
		})
	}
}

func TestItemHashFormats(t *testing.T) {
	valid := map[string]ItemType{
		"b236db23bf5ad005ad7f5d82eed08a68a925020f0755b2a59c03f784499198eb": ItemStorage,
		"01ba4719c80b6fe911b091a7c05124b64eeece964e09c058ef8f9805daca546b": ItemStorage,
		"QmPxCe3eHVCdTG5uKnSZTsPGrYvMFTWAAt4PSfK7ETkz4d":                   ItemIPFS,
		"QmX8K1c22WmQBAww5ShWQqwMiFif7XFrJD6iFBj7skQZXW":                   ItemIPFS,
		"bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi":      ItemIPFS,
	}
	for h, want := range valid {
		if got, err := ItemTypeOf(h); err != nil || got != want {
			t.Errorf("ItemTypeOf(%s) = %v, %v; want %v", h, got, err, want)
		}
	}
	invalid := []string{
		"fake-hash", "INVALID", "This is not a hash !",
		".//" + strings.Repeat("../", 12) + "root/.ssh/authorized_keys",
		strings.Repeat("X", 64),
		strings.Repeat("0123456789ABCDEF", 4),
		"Qm" + strings.Repeat("0", 42), "Qm" + strings.Repeat("O", 42), "Qm" + strings.Repeat("l", 42),
		"bafy" + strings.Repeat("1", 55), "bafy" + strings.Repeat("Z", 55),
	}
	for _, h := range invalid {
		if _, err := ParseItemHash(h); err == nil {
			t.Errorf("ParseItemHash(%q) accepted", h)
		}
	}
	// A non-string hash is a validation error, not a crash.
	doc := loadFixture(t, "forget")
	at(doc, "content")["hashes"] = []any{json.Number("12345")}
	_, err := regenerated(t, doc)
	issueAt(t, err, "content.hashes[0]")
}
