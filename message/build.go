package message

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Header is what a message says about itself besides its content: who
// sends it, on which chain and channel, and when.
type Header struct {
	Chain   string // default ETH
	Sender  string
	Channel string // empty: no channel
	Time    time.Time
}

// NewProgram builds a PROGRAM message: inline, unsigned, its item_content
// and item_hash computed as the reference's create_new_message does, then
// checked as any message the node receives. content.address and
// content.time default to the header's sender and time. It returns the
// message's JSON and the parsed message.
func NewProgram(h Header, content ProgramContent) ([]byte, *Message, error) {
	fillBase(&content.ExecutableBase, h)
	return buildMessage(h, TypeProgram, programWire{
		ExecutableBase: content.ExecutableBase, Type: content.Type, Environment: programEnvOf(content.Environment),
		Code: content.Code, Runtime: content.Runtime, Data: content.Data, Export: content.Export, On: content.On,
	})
}

// NewInstance builds an INSTANCE message, as NewProgram does a PROGRAM.
func NewInstance(h Header, content InstanceContent) ([]byte, *Message, error) {
	fillBase(&content.ExecutableBase, h)
	return buildMessage(h, TypeInstance, instanceWire{
		ExecutableBase: content.ExecutableBase, Environment: instanceEnvOf(content.Environment), Rootfs: content.Rootfs,
	})
}

// The wire forms of the contents: the fields aleph-message defines for
// each type, nothing more (a program's environment has no hypervisor, an
// instance's no reproducible or shared_cache).
type (
	programWire struct {
		ExecutableBase
		Type        string           `json:"type"`
		Environment programEnv       `json:"environment"`
		Code        CodeContent      `json:"code"`
		Runtime     FunctionRuntime  `json:"runtime"`
		Data        *DataContent     `json:"data,omitempty"`
		Export      *Export          `json:"export,omitempty"`
		On          FunctionTriggers `json:"on"`
	}
	instanceWire struct {
		ExecutableBase
		Environment instanceEnv  `json:"environment"`
		Rootfs      RootfsVolume `json:"rootfs"`
	}
	programEnv struct {
		Reproducible bool `json:"reproducible"`
		Internet     bool `json:"internet"`
		AlephAPI     bool `json:"aleph_api"`
		SharedCache  bool `json:"shared_cache"`
	}
	instanceEnv struct {
		Internet         bool                         `json:"internet"`
		AlephAPI         bool                         `json:"aleph_api"`
		Hypervisor       *Hypervisor                  `json:"hypervisor,omitempty"`
		TrustedExecution *TrustedExecutionEnvironment `json:"trusted_execution,omitempty"`
	}
)

func programEnvOf(e Environment) programEnv {
	return programEnv{Reproducible: e.Reproducible, Internet: e.Internet, AlephAPI: e.AlephAPI, SharedCache: e.SharedCache}
}

func instanceEnvOf(e Environment) instanceEnv {
	return instanceEnv{Internet: e.Internet, AlephAPI: e.AlephAPI, Hypervisor: e.Hypervisor, TrustedExecution: e.TrustedExecution}
}

func fillBase(b *ExecutableBase, h Header) {
	if b.Address == "" {
		b.Address = h.Sender
	}
	if b.Time == 0 {
		b.Time = float64(h.Time.Unix())
	}
	if b.Volumes == nil {
		b.Volumes = []MachineVolume{} // required, and a list
	}
}

// envelopeWire is the wire form of an unsigned inline message before
// Regenerate adds item_content and item_hash.
type envelopeWire struct {
	Chain     string  `json:"chain"`
	Sender    string  `json:"sender"`
	Type      Type    `json:"type"`
	Time      float64 `json:"time"`
	ItemType  string  `json:"item_type"`
	Signature *string `json:"signature"`
	Channel   *string `json:"channel,omitempty"`
	Content   any     `json:"content"`
}

func buildMessage(h Header, t Type, content any) ([]byte, *Message, error) {
	if h.Sender == "" {
		return nil, nil, errors.New("new message: no sender")
	}
	env := envelopeWire{Chain: h.Chain, Sender: h.Sender, Type: t, Time: float64(h.Time.UnixMilli()) / 1000,
		ItemType: string(ItemInline), Content: content}
	if env.Chain == "" {
		env.Chain = "ETH"
	}
	if h.Channel != "" {
		env.Channel = &h.Channel
	}
	raw, err := json.Marshal(env)
	if err != nil {
		return nil, nil, fmt.Errorf("new %s message: %w", t, err)
	}
	return regenerateAndParse(raw)
}

func regenerateAndParse(raw []byte) ([]byte, *Message, error) {
	raw, err := Regenerate(raw)
	if err != nil {
		return nil, nil, err
	}
	msg, err := Parse(raw)
	if err != nil {
		return nil, nil, err
	}
	return raw, msg, nil
}

// WithRootfsParent returns the INSTANCE message raw with its root
// filesystem's parent replaced by parent, item_content and item_hash
// regenerated; every other field is kept as it is, in its order. This is
// the reference's fake instance: a message written for another node's
// base image, run over a local one.
func WithRootfsParent(raw []byte, parent ParentVolume) ([]byte, *Message, error) {
	if len(raw) > MaxMessageSize {
		return nil, nil, fmt.Errorf("message is %d bytes, more than the %d allowed", len(raw), MaxMessageSize)
	}
	doc, err := decodeOrdered(raw)
	if err != nil {
		return nil, nil, err
	}
	env, _ := doc.(orderedObject)
	content, _ := env.vals["content"].(orderedObject)
	rootfs, _ := content.vals["rootfs"].(orderedObject)
	if env.vals["type"] != string(TypeInstance) || rootfs.vals == nil {
		return nil, nil, errors.New("not an INSTANCE message with its content inline and a rootfs")
	}
	rootfs.set("parent", orderedObject{keys: []string{"ref", "use_latest"},
		vals: map[string]any{"ref": string(parent.Ref), "use_latest": parent.UseLatest}})
	content.vals["rootfs"] = rootfs // set may have grown its keys
	out, err := pyDumps(env)
	if err != nil {
		return nil, nil, err
	}
	return regenerateAndParse([]byte(out))
}
