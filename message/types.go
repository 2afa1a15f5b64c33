package message

import (
	"encoding/json"
	"strings"
	"time"
)

// Type is a message's type.
type Type string

// The message types.
const (
	TypePost      Type = "POST"
	TypeAggregate Type = "AGGREGATE"
	TypeStore     Type = "STORE"
	TypeProgram   Type = "PROGRAM"
	TypeInstance  Type = "INSTANCE"
	TypeForget    Type = "FORGET"
)

// Types lists every message type.
var Types = []Type{TypePost, TypeAggregate, TypeStore, TypeProgram, TypeInstance, TypeForget}

// Hypervisor is an instance's requested hypervisor.
type Hypervisor string

// The hypervisors a message can ask for.
const (
	HypervisorQEMU        Hypervisor = "qemu"
	HypervisorFirecracker Hypervisor = "firecracker"
)

// Interface is how a program serves HTTP.
type Interface string

// The program interfaces.
const (
	InterfaceASGI   Interface = "asgi"
	InterfaceBinary Interface = "binary"
)

// Encoding is how code or data is packed.
type Encoding string

// The encodings of code and data.
const (
	EncodingPlain    Encoding = "plain"
	EncodingZip      Encoding = "zip"
	EncodingSquashfs Encoding = "squashfs"
)

// PaymentType is how an execution is paid for.
type PaymentType string

// The payment types; an absent payment means hold.
const (
	PaymentHold       PaymentType = "hold"
	PaymentSuperfluid PaymentType = "superfluid"
	PaymentCredit     PaymentType = "credit"
)

// Persistence says where a persistent volume lives.
type Persistence string

// The persistence kinds.
const (
	PersistenceHost  Persistence = "host"
	PersistenceStore Persistence = "store"
)

// Message is a validated Aleph message envelope with its typed content.
type Message struct {
	Chain         string         `json:"chain"`
	Sender        string         `json:"sender"`
	Type          Type           `json:"type"`
	Channel       *string        `json:"channel,omitempty"`
	Confirmations []Confirmation `json:"confirmations,omitempty"`
	Confirmed     *bool          `json:"confirmed,omitempty"`
	Signature     *string        `json:"signature"`
	Size          *int64         `json:"size,omitempty"`
	Time          time.Time      `json:"time"`
	ItemType      ItemType       `json:"item_type"`
	ItemContent   *string        `json:"item_content,omitempty"`
	HashType      *string        `json:"hash_type,omitempty"`
	ItemHash      ItemHash       `json:"item_hash"`
	ForgottenBy   []any          `json:"forgotten_by,omitempty"`

	// Content is the typed content. For inline messages it is parsed from
	// item_content, the signed bytes, rather than from the content field.
	Content Content `json:"-"`
}

// Confirmation records that a message was confirmed on a chain.
type Confirmation struct {
	Chain     string          `json:"chain"`
	Height    int64           `json:"height"`
	Hash      json.RawMessage `json:"hash"` // a string, or {"$binary": …, "$type": …}
	Time      *float64        `json:"time,omitempty"`
	Publisher *string         `json:"publisher,omitempty"`
}

// Content is the typed content of a message: one of *PostContent,
// *AggregateContent, *StoreContent, *ProgramContent, *InstanceContent or
// *ForgetContent.
type Content interface {
	MessageType() Type
}

// ExecutableContent is the content of a message that runs as a VM:
// *ProgramContent or *InstanceContent.
type ExecutableContent interface {
	Content
	Executable() *ExecutableBase
	Env() Environment
}

// ExecutableBase holds the fields shared by programs and instances.
type ExecutableBase struct {
	Address        string            `json:"address"`
	Time           float64           `json:"time"`
	AllowAmend     bool              `json:"allow_amend"`
	Metadata       map[string]any    `json:"metadata,omitempty"`
	AuthorizedKeys []string          `json:"authorized_keys,omitempty"`
	Variables      map[string]string `json:"variables,omitempty"`
	Resources      MachineResources  `json:"resources"`
	Payment        *Payment          `json:"payment,omitempty"`
	Requirements   *HostRequirements `json:"requirements,omitempty"`
	Volumes        []MachineVolume   `json:"volumes"`
	Replaces       *string           `json:"replaces,omitempty"`
}

// Environment merges FunctionEnvironment and InstanceEnvironment: programs
// never set Hypervisor or TrustedExecution in aleph-message 1.1.1.
type Environment struct {
	Reproducible     bool                         `json:"reproducible"`
	Internet         bool                         `json:"internet"`
	AlephAPI         bool                         `json:"aleph_api"`
	SharedCache      bool                         `json:"shared_cache"`
	Hypervisor       *Hypervisor                  `json:"hypervisor,omitempty"`
	TrustedExecution *TrustedExecutionEnvironment `json:"trusted_execution,omitempty"`
}

// TrustedExecutionEnvironment asks for a confidential (AMD SEV) VM.
type TrustedExecutionEnvironment struct {
	Firmware *ItemHash `json:"firmware,omitempty"`
	Policy   int64     `json:"policy"`
}

// MachineResources are the resources an execution asks for.
type MachineResources struct {
	VCPUs          int64           `json:"vcpus"`
	MemoryMiB      int64           `json:"memory"`
	Seconds        int64           `json:"seconds"`
	PublishedPorts []PublishedPort `json:"published_ports,omitempty"`
}

// PublishedPort is a guest port to expose on the host.
type PublishedPort struct {
	Protocol string `json:"protocol"`
	Port     int    `json:"port"`
}

// Payment says how an execution is paid for.
type Payment struct {
	Chain    *string     `json:"chain,omitempty"`
	Receiver *string     `json:"receiver,omitempty"`
	Type     PaymentType `json:"type"`
}

// HostRequirements constrain which node may run an execution.
type HostRequirements struct {
	CPU  *CPUProperties    `json:"cpu,omitempty"`
	Node *NodeRequirements `json:"node,omitempty"`
	GPU  []GPUProperties   `json:"gpu,omitempty"`
}

// CPUProperties are required CPU properties.
type CPUProperties struct {
	Architecture *string  `json:"architecture,omitempty"`
	Vendor       *string  `json:"vendor,omitempty"`
	Features     []string `json:"features,omitempty"`
}

// NodeRequirements pin an execution to nodes.
type NodeRequirements struct {
	Owner              *string   `json:"owner,omitempty"`
	AddressRegex       *string   `json:"address_regex,omitempty"`
	NodeHash           *ItemHash `json:"node_hash,omitempty"`
	TermsAndConditions *ItemHash `json:"terms_and_conditions,omitempty"`
}

// GPUProperties describe a GPU to pass through.
type GPUProperties struct {
	Vendor      string `json:"vendor"`
	DeviceName  string `json:"device_name"`
	DeviceClass string `json:"device_class"`
	DeviceID    string `json:"device_id"`
}

// VolumeKind tells the members of the volume union apart.
type VolumeKind string

// The volume kinds.
const (
	VolumeImmutable  VolumeKind = "immutable"
	VolumeEphemeral  VolumeKind = "ephemeral"
	VolumePersistent VolumeKind = "persistent"
)

// MachineVolume is one member of the volume union, flattened; Kind says
// which member it is and which fields are meaningful.
type MachineVolume struct {
	Comment *string `json:"comment,omitempty"`
	Mount   *string `json:"mount,omitempty"`
	// Immutable volumes.
	Ref       ItemHash `json:"ref,omitempty"`
	UseLatest bool     `json:"use_latest,omitempty"`
	// Ephemeral volumes.
	Ephemeral bool `json:"ephemeral,omitempty"`
	// Ephemeral and persistent volumes.
	SizeMiB int64 `json:"size_mib,omitempty"`
	// Persistent volumes.
	Parent      *ParentVolume `json:"parent,omitempty"`
	Persistence *Persistence  `json:"persistence,omitempty"`
	Name        *string       `json:"name,omitempty"`
}

// Kind returns which member of the union the volume is.
func (v MachineVolume) Kind() VolumeKind {
	switch {
	case v.Ref != "":
		return VolumeImmutable
	case v.Ephemeral:
		return VolumeEphemeral
	default:
		return VolumePersistent
	}
}

// ParentVolume names a base image to copy.
type ParentVolume struct {
	Ref       ItemHash `json:"ref"`
	UseLatest bool     `json:"use_latest"`
}

// ProgramContent is the content of a PROGRAM message.
type ProgramContent struct {
	ExecutableBase
	Type        string           `json:"type"`
	Environment Environment      `json:"environment"`
	Code        CodeContent      `json:"code"`
	Runtime     FunctionRuntime  `json:"runtime"`
	Data        *DataContent     `json:"data,omitempty"`
	Export      *Export          `json:"export,omitempty"`
	On          FunctionTriggers `json:"on"`
}

// MessageType implements Content.
func (*ProgramContent) MessageType() Type { return TypeProgram }

// Executable implements ExecutableContent.
func (c *ProgramContent) Executable() *ExecutableBase { return &c.ExecutableBase }

// Env implements ExecutableContent.
func (c *ProgramContent) Env() Environment { return c.Environment }

// CodeContent names a program's code.
type CodeContent struct {
	Encoding   Encoding   `json:"encoding"`
	Entrypoint string     `json:"entrypoint"`
	Ref        ItemHash   `json:"ref"`
	Interface  *Interface `json:"interface,omitempty"`
	Args       []string   `json:"args,omitempty"`
	UseLatest  bool       `json:"use_latest"`
}

// InferredInterface resolves the program's interface as the reference does:
// the explicit one, else asgi when the entrypoint has a colon, else binary.
func (c CodeContent) InferredInterface() Interface {
	switch {
	case c.Interface != nil:
		return *c.Interface
	case strings.Contains(c.Entrypoint, ":"):
		return InterfaceASGI
	default:
		return InterfaceBinary
	}
}

// FunctionRuntime names a program's root filesystem.
type FunctionRuntime struct {
	Ref       ItemHash `json:"ref"`
	UseLatest bool     `json:"use_latest"`
	Comment   string   `json:"comment"`
}

// DataContent names a program's input data.
type DataContent struct {
	Encoding  Encoding `json:"encoding"`
	Mount     string   `json:"mount"`
	Ref       ItemHash `json:"ref"`
	UseLatest *bool    `json:"use_latest,omitempty"`
}

// Export names data to export after a run.
type Export struct {
	Encoding Encoding `json:"encoding"`
	Mount    string   `json:"mount"`
}

// FunctionTriggers say when a program runs.
type FunctionTriggers struct {
	HTTP       bool             `json:"http"`
	Message    []map[string]any `json:"message,omitempty"`
	Persistent *bool            `json:"persistent,omitempty"`
}

// InstanceContent is the content of an INSTANCE message.
type InstanceContent struct {
	ExecutableBase
	Environment Environment  `json:"environment"`
	Rootfs      RootfsVolume `json:"rootfs"`
}

// MessageType implements Content.
func (*InstanceContent) MessageType() Type { return TypeInstance }

// Executable implements ExecutableContent.
func (c *InstanceContent) Executable() *ExecutableBase { return &c.ExecutableBase }

// Env implements ExecutableContent.
func (c *InstanceContent) Env() Environment { return c.Environment }

// RootfsVolume is an instance's root filesystem.
type RootfsVolume struct {
	Parent      ParentVolume `json:"parent"`
	Persistence Persistence  `json:"persistence"`
	SizeMiB     int64        `json:"size_mib"`
	ForgottenBy []string     `json:"forgotten_by,omitempty"`
}

// PostContent is the content of a POST message.
type PostContent struct {
	Address string  `json:"address"`
	Time    float64 `json:"time"`
	Content any     `json:"content,omitempty"`
	// Ref is a string or a ChainRef object, kept as JSON.
	Ref  json.RawMessage `json:"ref,omitempty"`
	Type string          `json:"type"`
}

// MessageType implements Content.
func (*PostContent) MessageType() Type { return TypePost }

// AggregateContent is the content of an AGGREGATE message.
type AggregateContent struct {
	Address string  `json:"address"`
	Time    float64 `json:"time"`
	// Key is a string or {"name": string}, kept as JSON.
	Key     json.RawMessage `json:"key"`
	Content map[string]any  `json:"content"`
}

// MessageType implements Content.
func (*AggregateContent) MessageType() Type { return TypeAggregate }

// StoreContent is the content of a STORE message: it names a stored file.
type StoreContent struct {
	Address     string         `json:"address"`
	Time        float64        `json:"time"`
	ItemType    ItemType       `json:"item_type"`
	ItemHash    ItemHash       `json:"item_hash"`
	Size        *int64         `json:"size,omitempty"`
	ContentType *string        `json:"content_type,omitempty"`
	Ref         *string        `json:"ref,omitempty"`
	Metadata    map[string]any `json:"metadata,omitempty"`
	Payment     *Payment       `json:"payment,omitempty"`
}

// MessageType implements Content.
func (*StoreContent) MessageType() Type { return TypeStore }

// ForgetContent is the content of a FORGET message.
type ForgetContent struct {
	Address    string     `json:"address"`
	Time       float64    `json:"time"`
	Hashes     []ItemHash `json:"hashes"`
	Aggregates []ItemHash `json:"aggregates"`
	Reason     *string    `json:"reason,omitempty"`
}

// MessageType implements Content.
func (*ForgetContent) MessageType() Type { return TypeForget }

func newContent(t Type) Content {
	switch t {
	case TypePost:
		return &PostContent{}
	case TypeAggregate:
		return &AggregateContent{}
	case TypeStore:
		return &StoreContent{}
	case TypeProgram:
		return &ProgramContent{}
	case TypeInstance:
		return &InstanceContent{}
	case TypeForget:
		return &ForgetContent{}
	}
	return nil
}
