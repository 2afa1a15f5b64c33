package message

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var testHeader = Header{Sender: testAddress, Channel: "alephvm-local", Time: time.Unix(1700000000, 250e6)}

func sampleInstanceContent() InstanceContent {
	hv := HypervisorFirecracker
	return InstanceContent{
		ExecutableBase: ExecutableBase{
			Metadata:       map[string]any{"name": "web"},
			AuthorizedKeys: []string{"ssh-ed25519 AAAA me@host"},
			Resources:      MachineResources{VCPUs: 2, MemoryMiB: 2048, Seconds: 30, PublishedPorts: []PublishedPort{{Protocol: "tcp", Port: 80}}},
		},
		Environment: Environment{Internet: true, Hypervisor: &hv, Reproducible: true, SharedCache: true},
		Rootfs:      RootfsVolume{Parent: ParentVolume{Ref: testRef}, Persistence: PersistenceHost, SizeMiB: 8192},
	}
}

func TestNewInstance(t *testing.T) {
	raw, msg, err := NewInstance(testHeader, sampleInstanceContent())
	if err != nil {
		t.Fatal(err)
	}
	again, err := Parse(raw)
	if err != nil {
		t.Fatalf("the built message does not parse: %v", err)
	}
	if diff := cmp.Diff(msg, again); diff != "" {
		t.Errorf("returned message differs from the parsed JSON:\n%s", diff)
	}
	if msg.ItemHash != ItemHash(SHA256Hex([]byte(*msg.ItemContent))) || msg.Type != TypeInstance || msg.Signature != nil ||
		msg.ItemType != ItemInline || *msg.Channel != "alephvm-local" || msg.Time.UnixMilli() != 1700000000250 {
		t.Errorf("envelope: %+v", msg)
	}
	c := msg.Content.(*InstanceContent)
	if c.Address != testAddress || c.Time != 1700000000 || c.Volumes == nil {
		t.Errorf("defaults: address %q, time %v, volumes %v", c.Address, c.Time, c.Volumes)
	}
	if c.Environment.Hypervisor == nil || *c.Environment.Hypervisor != HypervisorFirecracker || !c.Environment.Internet ||
		c.Rootfs.SizeMiB != 8192 || c.Resources.PublishedPorts[0].Port != 80 || c.Metadata["name"] != "web" {
		t.Errorf("content: %+v", c)
	}
	// An instance's environment has no reproducible or shared_cache.
	if strings.Contains(*msg.ItemContent, "reproducible") || strings.Contains(*msg.ItemContent, "shared_cache") {
		t.Errorf("item_content carries program fields: %s", *msg.ItemContent)
	}
}

func TestNewProgram(t *testing.T) {
	iface := InterfaceBinary
	content := ProgramContent{
		ExecutableBase: ExecutableBase{Resources: MachineResources{VCPUs: 1, MemoryMiB: 256, Seconds: 30},
			Variables: map[string]string{"GREETING": "hi"}},
		Type:        "vm-function",
		Environment: Environment{Internet: true, Hypervisor: new(Hypervisor)},
		Code:        CodeContent{Encoding: EncodingZip, Entrypoint: "hello", Ref: testRef, Interface: &iface},
		Runtime:     FunctionRuntime{Ref: testRef, Comment: "alephvm runtime"},
		On:          FunctionTriggers{HTTP: true},
	}
	raw, msg, err := NewProgram(testHeader, content)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Parse(raw); err != nil {
		t.Fatal(err)
	}
	c := msg.Content.(*ProgramContent)
	if c.Code.InferredInterface() != InterfaceBinary || c.Variables["GREETING"] != "hi" || !c.On.HTTP || !c.Environment.Internet || c.Address != testAddress {
		t.Errorf("content: %+v", c)
	}
	if strings.Contains(*msg.ItemContent, "hypervisor") {
		t.Errorf("a program's environment names a hypervisor: %s", *msg.ItemContent)
	}
}

func TestNewMessageRefusesInvalidContent(t *testing.T) {
	c := sampleInstanceContent()
	c.Resources.VCPUs = 0
	_, _, err := NewInstance(testHeader, c)
	var verr *ValidationError
	if !errors.As(err, &verr) || !strings.Contains(err.Error(), "content.resources.vcpus") {
		t.Errorf("vcpus 0: %v", err)
	}
	c = sampleInstanceContent()
	c.Rootfs.Parent.Ref = "not a hash"
	if _, _, err := NewInstance(testHeader, c); err == nil || !strings.Contains(err.Error(), "content.rootfs.parent.ref") {
		t.Errorf("bad parent ref: %v", err)
	}
	if _, _, err := NewInstance(Header{Time: testHeader.Time}, sampleInstanceContent()); err == nil {
		t.Error("a message without a sender was built")
	}
	if _, _, err := NewInstance(Header{Sender: testAddress, Chain: "NOPE", Time: testHeader.Time}, sampleInstanceContent()); err == nil || !strings.Contains(err.Error(), "chain") {
		t.Errorf("unknown chain: %v", err)
	}
}

func TestWithRootfsParent(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(fixtureDir(t), "instance_machine.json"))
	if err != nil {
		t.Fatal(err)
	}
	parent := ParentVolume{Ref: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
	out, msg, err := WithRootfsParent(raw, parent)
	if err != nil {
		t.Fatal(err)
	}
	c := msg.Content.(*InstanceContent)
	if c.Rootfs.Parent != parent || c.Rootfs.SizeMiB != 20000 || msg.ItemHash != ItemHash(SHA256Hex([]byte(*msg.ItemContent))) {
		t.Errorf("rootfs %+v, hash %s", c.Rootfs, msg.ItemHash)
	}
	// Everything but the parent is as it was.
	var before, after map[string]any
	json.Unmarshal(raw, &before)
	json.Unmarshal(out, &after)
	for _, doc := range []map[string]any{before, after} {
		delete(doc["content"].(map[string]any)["rootfs"].(map[string]any), "parent")
		delete(doc, "item_content")
		delete(doc, "item_hash")
	}
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("other fields changed:\n%s", diff)
	}
}

func TestWithRootfsParentRefusesOtherMessages(t *testing.T) {
	program, _ := json.Marshal(newMessage(t, TypeProgram, sampleProgram()))
	noRootfs := `{"chain":"ETH","sender":"a","type":"INSTANCE","time":1,"item_type":"inline","signature":null,"content":{"address":"a"}}`
	notInline := `{"chain":"ETH","sender":"a","type":"INSTANCE","time":1,"item_type":"storage","signature":null,"item_hash":"` + testRef + `"}`
	rootfsNotObject := `{"chain":"ETH","sender":"a","type":"INSTANCE","time":1,"item_type":"inline","content":{"rootfs":[1,2]}}`
	for name, raw := range map[string]string{
		"program": string(program), "no rootfs": noRootfs, "not inline": notInline, "rootfs a list": rootfsNotObject,
		"not JSON": "{", "a list": "[]", "too deep": strings.Repeat("[", 2000), "too large": `"` + strings.Repeat("x", MaxMessageSize) + `"`,
	} {
		if _, _, err := WithRootfsParent([]byte(raw), ParentVolume{Ref: testRef}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A rootfs whose other fields are invalid is refused by validation.
	bad := `{"chain":"ETH","sender":"a","type":"INSTANCE","time":1,"item_type":"inline","signature":null,"content":{"rootfs":{"size_mib":-1}}}`
	if _, _, err := WithRootfsParent([]byte(bad), ParentVolume{Ref: testRef}); err == nil {
		t.Error("an invalid instance was regenerated")
	}
}
