package message

import (
	"encoding/json"
	"runtime"
	"strings"
	"testing"
	"time"
)

const (
	testAddress = "0x101d8D16372dBf5f1614adaE95Ee5CCE61998Fc9"
	testRef     = "7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003"
)

// newMessage builds a message of the given type around content, with
// item_content and item_hash regenerated.
func newMessage(t *testing.T, typ Type, content map[string]any) map[string]any {
	t.Helper()
	return map[string]any{
		"chain": "ETH", "sender": testAddress, "type": string(typ), "time": "1625652287.017",
		"item_type": "inline", "content": content, "signature": "0x123456789",
	}
}

func sampleProgram() map[string]any {
	return map[string]any{
		"address": testAddress, "time": 1625652287.017, "type": "vm-function", "allow_amend": false,
		"code":        map[string]any{"encoding": "zip", "entrypoint": "example_fastapi_2:app", "ref": testRef, "use_latest": false},
		"on":          map[string]any{"http": false},
		"environment": map[string]any{"reproducible": false, "internet": false, "aleph_api": false, "shared_cache": false},
		"runtime":     map[string]any{"ref": testRef, "comment": "Dummy hash", "use_latest": true},
		"resources": map[string]any{"vcpus": 1, "memory": 128, "seconds": 1, "published_ports": []any{
			map[string]any{"protocol": "tcp", "port": 80}, map[string]any{"protocol": "udp", "port": 53},
		}},
		"volumes": []any{},
	}
}

func sampleStore(payment any) map[string]any {
	c := map[string]any{"address": testAddress, "time": 1625652287.017, "item_type": "storage", "item_hash": testRef}
	if payment != nil {
		c["payment"] = payment
	}
	return c
}

func TestInlineMessagesOfTheReferenceTests(t *testing.T) {
	cases := []struct {
		name    string
		typ     Type
		content map[string]any
		path    string // "" when valid
		msg     string
	}{
		{"program with published ports", TypeProgram, sampleProgram(), "", ""},
		{"post with a string time", TypePost, map[string]any{
			"address": testAddress, "type": "test-message", "time": "1625652287.017", "content": map[string]any{"hello": "world"},
		}, "", ""},
		{"post amend without ref", TypePost, map[string]any{"address": "0x1", "time": 1.0, "type": "amend", "content": map[string]any{}},
			"content.type", "A 'ref' is required for POST type 'amend'"},
		{"post amend with ref", TypePost, map[string]any{"address": "0x1", "time": 1.0, "type": "amend", "ref": "0x123"}, "", ""},
		{"store with credit", TypeStore, sampleStore(map[string]any{"type": "credit"}), "", ""},
		{"store with hold", TypeStore, sampleStore(map[string]any{"type": "hold"}), "", ""},
		{"store without payment", TypeStore, sampleStore(nil), "", ""},
		{"store with superfluid", TypeStore, sampleStore(map[string]any{"type": "superfluid", "receiver": "0xReceiver"}),
			"content.payment", "Only 'hold' and 'credit' payment types are supported"},
		{"store ignores extras", TypeStore, func() map[string]any {
			c := sampleStore(nil)
			c["legacy"] = 1
			return c
		}(), "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			msg, err := regenerated(t, newMessage(t, tc.typ, tc.content))
			if tc.path == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				if tc.typ == TypePost && !msg.Time.Equal(time.Date(2021, 7, 7, 10, 4, 47, 17e6, time.UTC)) {
					t.Errorf("time = %v", msg.Time)
				}
				return
			}
			if is := issueAt(t, err, tc.path); !strings.Contains(is.Msg, tc.msg) {
				t.Errorf("issue = %q, want %q", is.Msg, tc.msg)
			}
		})
	}
}

// sampleInstance returns a valid INSTANCE message's content to mutate.
func sampleInstance(t *testing.T) map[string]any {
	t.Helper()
	return at(loadFixture(t, "instance_machine"), "content")
}

func TestFieldRules(t *testing.T) {
	type mut = func(c map[string]any)
	set := func(keys ...string) func(v any) mut {
		return func(v any) mut {
			return func(c map[string]any) {
				m := c
				for _, k := range keys[:len(keys)-1] {
					m = m[k].(map[string]any)
				}
				m[keys[len(keys)-1]] = v
			}
		}
	}
	vcpus := set("resources", "vcpus")
	cases := []struct {
		name   string
		mutate mut
		path   string // "" when valid
		msg    string
	}{
		{"vcpus zero", vcpus(0), "content.resources.vcpus", "must be between 1 and 256, got 0"},
		{"vcpus above", vcpus(257), "content.resources.vcpus", "must be between 1 and 256, got 257"},
		{"vcpus lax string", vcpus("2"), "", ""},
		{"vcpus lax float", vcpus(2.0), "", ""},
		{"vcpus lax bool", vcpus(true), "", ""},
		{"vcpus fractional", vcpus(2.5), "content.resources.vcpus", "must be an integer"},
		{"vcpus object", vcpus(map[string]any{}), "content.resources.vcpus", "must be an integer, got object"},
		{"memory above 1 TiB", set("resources", "memory")(MaxMemoryMiB + 1), "content.resources.memory", "between 1 and 1048576"},
		{"seconds above ten years", set("resources", "seconds")(MaxSeconds + 1), "content.resources.seconds", ""},
		{"port zero", set("resources", "published_ports")([]any{map[string]any{"port": 0}}), "content.resources.published_ports[0].port", ""},
		{"port protocol", set("resources", "published_ports")([]any{map[string]any{"port": 22, "protocol": "sctp"}}),
			"content.resources.published_ports[0].protocol", `must be one of "tcp", "udp"`},
		{"rootfs size strict float", set("rootfs", "size_mib")(json.Number("20000.0")), "content.rootfs.size_mib", "must be an integer"},
		{"rootfs size strict string", set("rootfs", "size_mib")("20000"), "content.rootfs.size_mib", "must be an integer"},
		{"rootfs size cap", set("rootfs", "size_mib")(MaxPersistentVolumeMiB + 1), "content.rootfs.size_mib", ""},
		{"rootfs bad parent", set("rootfs", "parent", "ref")("fake-hash"), "content.rootfs.parent.ref", "could not determine hash type"},
		{"content time negative", set("time")(-1), "content.time", "between 0 and"},
		{"content time ISO", set("time")("2021-07-07T10:04:47Z"), "content.time", "finite number"},
		{"allow_amend missing", func(c map[string]any) { delete(c, "allow_amend") }, "content.allow_amend", "field required"},
		{"allow_amend lax yes", set("allow_amend")("yes"), "", ""},
		{"volumes null", set("volumes")(nil), "content.volumes", "must be a list, got null"},
		{"instance type forbidden", set("type")("vm-instance"), "content.type", "unknown field"},
		{"unknown content key", set("surprise")(1), "content.surprise", "unknown field"},
		{"resources ignore extras", set("resources", "gpus")(4), "", ""},
		{"requirements forbid extras", set("requirements")(map[string]any{"custom": 1}), "content.requirements.custom", "unknown field"},
		{"address_regex unclosed", set("requirements")(map[string]any{"node": map[string]any{"address_regex": "[unclosed"}}),
			"content.requirements.node.address_regex", "invalid regular expression"},
		{"address_regex python lookahead", set("requirements")(map[string]any{"node": map[string]any{"address_regex": "^(?=0x)"}}), "", ""},
		{"tee extra forbidden", func(c map[string]any) {
			c["environment"] = map[string]any{"hypervisor": "qemu", "trusted_execution": map[string]any{"policy": 1, "x": 1}}
		}, "content.environment.trusted_execution.x", "unknown field"},
		{"empty tee on firecracker", func(c map[string]any) {
			c["environment"] = map[string]any{"hypervisor": "firecracker", "trusted_execution": map[string]any{}}
		}, "content.environment.trusted_execution", "only supported for QEmu"},
		{"variables non-string", set("variables")(map[string]any{"N": 1}), "content.variables.N", "must be a string"},
		{"gpu device class", set("requirements")(map[string]any{"gpu": []any{
			map[string]any{"vendor": "NVIDIA", "device_name": "x", "device_class": "0301", "device_id": "10de:2504"},
		}}), "content.requirements.gpu[0].device_class", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := sampleInstance(t)
			tc.mutate(c)
			_, err := regenerated(t, newMessage(t, TypeInstance, c))
			if tc.path == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			if is := issueAt(t, err, tc.path); !strings.Contains(is.Msg, tc.msg) {
				t.Errorf("issue = %q, want it to contain %q", is.Msg, tc.msg)
			}
		})
	}
}

func TestVolumeUnion(t *testing.T) {
	cases := []struct {
		volume map[string]any
		kind   VolumeKind
		path   string // "" when valid
	}{
		{map[string]any{"ref": testRef, "mount": "/opt/venv"}, VolumeImmutable, ""},
		{map[string]any{"size_mib": 5}, VolumeEphemeral, ""},
		{map[string]any{"ephemeral": true, "size_mib": 1000}, VolumeEphemeral, ""},
		{map[string]any{"ephemeral": false, "size_mib": 5}, "", "content.volumes[0].ephemeral"},
		{map[string]any{"size_mib": 1001}, VolumePersistent, ""},
		{map[string]any{"name": "data", "persistence": "host", "size_mib": 10}, VolumePersistent, ""},
		{map[string]any{"parent": map[string]any{"ref": testRef}, "size_mib": 10}, VolumePersistent, ""},
		{map[string]any{"persistence": "host", "size_mib": json.Number("5.0")}, "", "content.volumes[0].size_mib"},
		{map[string]any{"persistence": "cloud", "size_mib": 5}, "", "content.volumes[0].persistence"},
		{map[string]any{"ref": testRef, "size_mib": 5}, "", "content.volumes[0].size_mib"},
		{map[string]any{"mount": "/x"}, "", "content.volumes[0].size_mib"},
	}
	for _, tc := range cases {
		c := sampleInstance(t)
		c["volumes"] = []any{tc.volume}
		msg, err := regenerated(t, newMessage(t, TypeInstance, c))
		if tc.path != "" {
			issueAt(t, err, tc.path)
			continue
		}
		if err != nil {
			t.Errorf("%v: %v", tc.volume, err)
			continue
		}
		if got := msg.Content.(*InstanceContent).Volumes[0].Kind(); got != tc.kind {
			t.Errorf("%v: kind %s, want %s", tc.volume, got, tc.kind)
		}
	}
}

func TestSubscriptionEntries(t *testing.T) {
	sub := func(n int) map[string]any {
		m := map[string]any{}
		for i := range n {
			m[strings.Repeat("k", i+1)] = "v"
		}
		return m
	}
	c := sampleProgram()
	c["on"] = map[string]any{"http": true, "message": []any{sub(MaxSubscriptionEntries)}}
	if _, err := regenerated(t, newMessage(t, TypeProgram, c)); err != nil {
		t.Fatalf("32 entries: %v", err)
	}
	c["on"] = map[string]any{"http": true, "message": []any{sub(MaxSubscriptionEntries + 1)}}
	_, err := regenerated(t, newMessage(t, TypeProgram, c))
	issueAt(t, err, "content.on.message[0]")
	c["on"] = map[string]any{"http": true, "cron": "* * * * *"}
	_, err = regenerated(t, newMessage(t, TypeProgram, c))
	issueAt(t, err, "content.on.cron")
}

func TestProgramContentTyped(t *testing.T) {
	msg, err := regenerated(t, loadFixture(t, "machine"))
	if err != nil {
		t.Fatal(err)
	}
	var exec ExecutableContent = msg.Content.(*ProgramContent)
	p := exec.(*ProgramContent)
	if p.Code.InferredInterface() != InterfaceASGI || p.Code.Encoding != EncodingZip {
		t.Errorf("code = %+v", p.Code)
	}
	if p.Runtime.UseLatest || p.Runtime.Comment != "Aleph Alpine Linux with Python 3.8" {
		t.Errorf("runtime = %+v", p.Runtime)
	}
	kinds := []VolumeKind{VolumeImmutable, VolumeEphemeral, VolumePersistent, VolumePersistent, VolumePersistent}
	for i, v := range exec.Executable().Volumes {
		if v.Kind() != kinds[i] {
			t.Errorf("volume %d: kind %s, want %s", i, v.Kind(), kinds[i])
		}
	}
	if exec.Executable().Resources.Seconds != 30 || exec.Env().Internet || !exec.Env().Reproducible {
		t.Errorf("resources %+v env %+v", exec.Executable().Resources, exec.Env())
	}
	if p.Data == nil || p.Data.Mount != "/data" || p.Export == nil {
		t.Errorf("data %+v export %+v", p.Data, p.Export)
	}
	if p.Variables["VM_CUSTOM_VARIABLE_2"] != "32" {
		t.Errorf("variables = %v", p.Variables)
	}
}

func TestInstanceDefaults(t *testing.T) {
	c := sampleInstance(t)
	c["resources"] = map[string]any{}
	msg, err := regenerated(t, newMessage(t, TypeInstance, c))
	if err != nil {
		t.Fatal(err)
	}
	res := msg.Content.(*InstanceContent).Resources
	if res.VCPUs != 1 || res.MemoryMiB != 128 || res.Seconds != 1 {
		t.Errorf("defaults = %+v", res)
	}
}

func TestEnvelopeRules(t *testing.T) {
	base := func(t *testing.T) map[string]any {
		out, err := Regenerate(readFixture(t, "instance_machine"))
		if err != nil {
			t.Fatal(err)
		}
		return decodeMap(t, out)
	}
	cases := []struct {
		name   string
		mutate func(doc map[string]any)
		path   string // "" when valid
		msg    string
	}{
		{"as regenerated", func(map[string]any) {}, "", ""},
		{"wrong hash", func(d map[string]any) { d["item_hash"] = strings.Repeat("a", 64) }, "item_hash", "do not match"},
		{"inline without item_content", func(d map[string]any) { delete(d, "item_content") }, "item_content", "Item content not specified"},
		{"item_content on storage", func(d map[string]any) { d["item_type"] = "storage" }, "item_content", "cannot be defined when 'item_type' == 'storage'"},
		{"item_content not JSON", func(d map[string]any) { d["item_content"] = "{" }, "item_content", "does not appear to be valid JSON"},
		{"storage with a CID", func(d map[string]any) {
			delete(d, "item_content")
			d["item_type"] = "storage"
			d["item_hash"] = "QmPxCe3eHVCdTG5uKnSZTsPGrYvMFTWAAt4PSfK7ETkz4d"
		}, "item_hash", "sha256 hex digest"},
		{"ipfs", func(d map[string]any) {
			delete(d, "item_content")
			d["item_type"] = "ipfs"
			d["item_hash"] = "QmPxCe3eHVCdTG5uKnSZTsPGrYvMFTWAAt4PSfK7ETkz4d"
		}, "", ""},
		{"signature key required", func(d map[string]any) { delete(d, "signature") }, "signature", "field required"},
		{"signature null", func(d map[string]any) { d["signature"] = nil }, "", ""},
		{"unknown chain", func(d map[string]any) { d["chain"] = "BTC" }, "chain", "must be one of"},
		{"unknown type", func(d map[string]any) { d["type"] = "VOTE" }, "type", "must be one of"},
		{"unknown envelope key", func(d map[string]any) { d["extra"] = true }, "extra", "unknown field"},
		{"channel too long", func(d map[string]any) { d["channel"] = strings.Repeat("c", 129) }, "channel", "at most 128"},
		{"confirmed without confirmations", func(d map[string]any) { d["confirmed"] = true; delete(d, "confirmations") },
			"confirmed", "cannot be 'confirmed' without 'confirmations'"},
		{"mongo id", func(d map[string]any) { d["_id"] = map[string]any{"$oid": "6080402d7f44efefd611dc1e"} }, "", ""},
		{"milliseconds", func(d map[string]any) { d["time"] = json.Number("1619017773895") }, "", ""},
		{"naive ISO time", func(d map[string]any) { d["time"] = "2021-07-07T10:04:47.017" }, "", ""},
		{"bad time", func(d map[string]any) { d["time"] = "yesterday" }, "time", "ISO 8601"},
		{"hash_type md5", func(d map[string]any) { d["hash_type"] = "md5" }, "hash_type", `must be one of "sha256"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			doc := base(t)
			tc.mutate(doc)
			data, _ := json.Marshal(doc)
			_, err := Parse(data)
			if tc.path == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			if is := issueAt(t, err, tc.path); !strings.Contains(is.Msg, tc.msg) {
				t.Errorf("issue = %q, want it to contain %q", is.Msg, tc.msg)
			}
		})
	}
}

func TestSignedItemContentIsValidated(t *testing.T) {
	// An INSTANCE whose content field is valid but whose signed item_content
	// is not must be refused: the signed bytes are what the node runs.
	out, _ := Regenerate(readFixture(t, "instance_machine"))
	doc := decodeMap(t, out)
	content := at(doc, "content")
	bad := map[string]any{}
	for k, v := range content {
		bad[k] = v
	}
	bad["resources"] = map[string]any{"vcpus": 0}
	ic, _ := json.Marshal(bad)
	doc["item_content"] = string(ic)
	doc["item_hash"] = SHA256Hex(ic)
	data, _ := json.Marshal(doc)
	_, err := Parse(data)
	issueAt(t, err, "item_content.resources.vcpus")
}

func TestHostileInput(t *testing.T) {
	t.Run("50 MB", func(t *testing.T) {
		big := []byte(`{"chain":"ETH","content":"` + strings.Repeat("a", 50<<20) + `"}`)
		if _, err := Parse(big); err == nil || !strings.Contains(err.Error(), "more than") {
			t.Errorf("err = %v", err)
		}
		if _, err := ReadMessage(strings.NewReader(string(big))); err == nil {
			t.Error("ReadMessage accepted 50 MB")
		}
	})
	t.Run("200,000-deep nesting", func(t *testing.T) {
		deep := strings.Repeat("[", 200_000) + strings.Repeat("]", 200_000)
		for _, doc := range []string{deep, `{"content":` + deep + `}`} {
			if _, err := Parse([]byte(doc)); err == nil {
				t.Error("deep nesting accepted")
			}
			if _, err := Regenerate([]byte(doc)); err == nil {
				t.Error("regenerate accepted deep nesting")
			}
		}
	})
	t.Run("two million values", func(t *testing.T) {
		// Within MaxMessageSize, but decoding, validating and typing it
		// allocated about 400 MiB, 100 MiB of them live at once.
		list := "[" + strings.Repeat("1,", 2_000_000) + "1]"
		doc := []byte(`{"chain":"ETH","content":{"metadata":{"x":` + list + `}}}`)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := Parse(doc)
		runtime.ReadMemStats(&after)
		if err == nil || !strings.Contains(err.Error(), "more than 100000 values") {
			t.Errorf("err = %v", err)
		}
		if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
			t.Errorf("%d MiB allocated to refuse it", n>>20)
		}
		if _, err := Regenerate(doc); err == nil {
			t.Error("regenerate accepted two million values")
		}
	})
	t.Run("not an object", func(t *testing.T) {
		for _, doc := range []string{`[]`, `"x"`, `null`, `{} {}`, ``, `{"a":1}x`} {
			if _, err := Parse([]byte(doc)); err == nil {
				t.Errorf("%q accepted", doc)
			}
		}
	})
}

func TestPyDumps(t *testing.T) {
	// Produced by Python 3.11: json.dumps(value, separators=(",", ":")).
	in := `{"a":1.0,"b":1e16,"c":1e-05,"d":0.0001,"e":-0.0,"f":123456789012345678901234567890,` +
		`"g":"é\u2028😀\u007f\u0001\"\\\/","h":[1.5e300,2.5,100.0,1E2,-0],"i":1619017773.8950517,"j":0.1}`
	want := `{"a":1.0,"b":1e+16,"c":1e-05,"d":0.0001,"e":-0.0,"f":123456789012345678901234567890,` +
		`"g":"\u00e9\u2028\ud83d\ude00\u007f\u0001\"\\/","h":[1.5e+300,2.5,100.0,100.0,0],"i":1619017773.8950517,"j":0.1}`
	v, err := decodeOrdered([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	got, err := pyDumps(v)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("pyDumps =\n%s\nwant\n%s", got, want)
	}
	// A repeated key keeps its first place and its last value, as in Python.
	v, _ = decodeOrdered([]byte(`{"a":1,"b":2,"a":3}`))
	if got, _ := pyDumps(v); got != `{"a":3,"b":2}` {
		t.Errorf("duplicate keys: %s", got)
	}
}

func TestPyEqual(t *testing.T) {
	n := func(s string) json.Number { return json.Number(s) }
	equal := [][2]any{
		{n("1"), n("1.0")}, {n("1"), true}, {n("0"), false}, {float64(2), n("2")},
		{map[string]any{"a": n("1")}, map[string]any{"a": 1.0}}, {[]any{"x"}, []any{"x"}}, {nil, nil},
	}
	for _, pair := range equal {
		if !pyEqual(pair[0], pair[1]) {
			t.Errorf("%v != %v", pair[0], pair[1])
		}
	}
	differ := [][2]any{
		{n("1"), "1"}, {nil, false}, {map[string]any{"a": nil}, map[string]any{}}, {[]any{}, map[string]any{}},
		{n("9007199254740993"), n("9007199254740992.0")},
	}
	for _, pair := range differ {
		if pyEqual(pair[0], pair[1]) {
			t.Errorf("%v == %v", pair[0], pair[1])
		}
	}
}
