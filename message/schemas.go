package message

import (
	"encoding/json"
	"errors"
	"math/big"
	"regexp"
	"regexp/syntax"
)

// The schemas below transcribe aleph-message 1.1.1 model by model, in field
// declaration order (Pydantic validates in that order, and some validators
// read earlier fields). See docs/message-schema.md for where this port
// deliberately differs.

// Bounds of aleph-message 1.1.1.
const (
	MaxChannelLength       = 128
	MaxContentTime         = 9_223_372_036.0
	MaxMetadataEntries     = 256
	MaxAuthorizedKeys      = 256
	MaxAuthorizedKeyLength = 8192
	MaxVariableEntries     = 256
	MaxVariableKeyLength   = 128
	MaxVariableValueLength = 4096
	MaxVolumes             = 256
	MaxReplacesLength      = 128
	MaxVolumeLabelLength   = 256
	MaxAddressRegexLength  = 256
	MaxSubscriptionEntries = 32
	MaxForgetTargets       = 1000
	MaxForgetReasonLength  = 1000
	MaxVCPUs               = 256
	MaxMemoryMiB           = 1024 * 1024
	MaxSeconds             = 10 * 365 * 24 * 3600
	MaxEphemeralVolumeMiB  = 1000
	MaxPersistentVolumeMiB = 1_953_125 // ceil(2048 GB / 1 MiB)
	MaxInlineContentLength = 200_000   // pyaleph's MAX_INLINE_SIZE, in code points
)

// Chains lists the 33 chains of aleph-message 1.1.1.
var Chains = []string{
	"ARB", "AURORA", "AVAX", "BASE", "BLAST", "BOB", "BSC", "CSDK", "CYBER", "DOT", "ES", "ETH",
	"ETHERLINK", "FRAX", "HYPE", "INK", "LENS", "LINEA", "LISK", "METIS", "MODE", "NEO", "NULS",
	"NULS2", "OP", "POL", "SOL", "STT", "SONIC", "TEZOS", "UNICHAIN", "WLD", "ZORA",
}

var (
	chainType    = enumType(Chains...)
	encodingType = enumType("plain", "zip", "squashfs")
	itemTypeType = enumType(string(ItemInline), string(ItemStorage), string(ItemIPFS))
	strictSize   = func(max int64) typ { return intType(intBounds{min: 1, max: max, strict: true}) }
	laxInt       = intType(int64Range)
	stringList   = listType(anyString, 0)
	label        = strType(MaxVolumeLabelLength)
	defFalse     = false
	defTrue      = true
)

func req(key string, t typ) field        { return field{key: key, t: t, required: true} }
func opt(key string, t typ) field        { return field{key: key, t: t, nullable: true} }
func def(key string, t typ, d any) field { return field{key: key, t: t, def: d} }

// baseContent holds BaseContent's fields, shared by every content model.
func baseContent() []field {
	return []field{
		req("address", anyString),
		req("time", floatType(0, MaxContentTime)),
	}
}

var parentVolume = &model{name: "ParentVolume", extra: extraIgnore, fields: []field{
	req("ref", itemHashType),
	def("use_latest", boolType, defTrue),
}}

func volumeModel(name string, own ...field) *model {
	fields := append([]field{opt("comment", label), opt("mount", label)}, own...)
	return &model{name: name, extra: extraForbid, fields: fields}
}

var (
	immutableVolume = volumeModel("ImmutableVolume",
		req("ref", itemHashType),
		def("use_latest", boolType, defTrue),
	)
	ephemeralVolume = volumeModel("EphemeralVolume",
		def("ephemeral", literalTrue, defTrue),
		req("size_mib", strictSize(MaxEphemeralVolumeMiB)),
	)
	persistentVolume = volumeModel("PersistentVolume",
		opt("parent", parentVolume.typ()),
		opt("persistence", enumType("host", "store")),
		opt("name", label),
		req("size_mib", strictSize(MaxPersistentVolumeMiB)),
	)
)

func literalTrue(c *checker, p path, v any) (any, bool) {
	if b, ok := v.(bool); !ok || !b {
		c.fail(p, "must be true, got %s", describe(v))
		return nil, false
	}
	return true, true
}

// volumeKind classifies a volume object as the undiscriminated Pydantic
// union does in practice: a ref makes it immutable; persistence, name,
// parent or a size above the ephemeral cap make it persistent.
func volumeKind(m map[string]any) VolumeKind {
	if _, ok := m["ref"]; ok {
		return VolumeImmutable
	}
	for _, k := range []string{"persistence", "name", "parent"} {
		if _, ok := m[k]; ok {
			return VolumePersistent
		}
	}
	if n, ok := m["size_mib"].(json.Number); ok && isIntLiteral(string(n)) {
		if v, ok := new(big.Int).SetString(string(n), 10); ok && v.Cmp(big.NewInt(MaxEphemeralVolumeMiB)) > 0 {
			return VolumePersistent
		}
	}
	return VolumeEphemeral
}

func machineVolume(c *checker, p path, v any) (any, bool) {
	m, ok := v.(map[string]any)
	if !ok {
		c.fail(p, "must be an object, got %s", describe(v))
		return nil, false
	}
	switch volumeKind(m) {
	case VolumeImmutable:
		return immutableVolume.validate(c, p, m)
	case VolumePersistent:
		return persistentVolume.validate(c, p, m)
	default:
		return ephemeralVolume.validate(c, p, m)
	}
}

var publishedPort = &model{name: "PublishedPort", extra: extraIgnore, fields: []field{
	def("protocol", enumType("tcp", "udp"), "tcp"),
	req("port", intType(intBounds{min: 1, max: 65535})),
}}

var machineResources = &model{name: "MachineResources", extra: extraIgnore, fields: []field{
	def("vcpus", intType(intBounds{min: 1, max: MaxVCPUs}), json.Number("1")),
	def("memory", intType(intBounds{min: 1, max: MaxMemoryMiB}), json.Number("128")),
	def("seconds", intType(intBounds{min: 1, max: MaxSeconds}), json.Number("1")),
	opt("published_ports", listType(publishedPort.typ(), 0)),
}}

var payment = &model{name: "Payment", extra: extraIgnore, fields: []field{
	opt("chain", chainType),
	opt("receiver", anyString),
	req("type", enumType(string(PaymentHold), string(PaymentSuperfluid), string(PaymentCredit))),
}}

var cpuProperties = &model{name: "CpuProperties", extra: extraForbid, fields: []field{
	opt("architecture", enumType("x86_64", "arm64")),
	opt("vendor", anyString),
	opt("features", stringList),
}}

var nodeRequirements = &model{name: "NodeRequirements", extra: extraForbid, fields: []field{
	opt("owner", anyString),
	{key: "address_regex", t: strType(MaxAddressRegexLength), nullable: true, check: checkRegex},
	opt("node_hash", itemHashType),
	opt("terms_and_conditions", itemHashType),
}}

// checkRegex requires address_regex to compile. The reference compiles it
// with Python's re; RE2 lacks lookarounds and backreferences, so a pattern
// rejected only for unsupported Perl syntax is accepted as Python would.
func checkRegex(c *checker, p path, v any, _ map[string]any) (any, bool) {
	_, err := regexp.Compile(v.(string))
	var serr *syntax.Error
	if err != nil && !(errors.As(err, &serr) && serr.Code == syntax.ErrInvalidPerlOp) {
		c.fail(p, "invalid regular expression: %v", err)
		return nil, false
	}
	return v, true
}

var gpuProperties = &model{name: "GpuProperties", extra: extraForbid, fields: []field{
	req("vendor", anyString),
	req("device_name", anyString),
	req("device_class", enumType("0300", "0302")),
	req("device_id", anyString),
}}

var hostRequirements = &model{name: "HostRequirements", extra: extraForbid, fields: []field{
	opt("cpu", cpuProperties.typ()),
	opt("node", nodeRequirements.typ()),
	opt("gpu", listType(gpuProperties.typ(), 0)),
}}

var functionEnvironment = &model{name: "FunctionEnvironment", extra: extraIgnore, fields: []field{
	def("reproducible", boolType, defFalse),
	def("internet", boolType, defFalse),
	def("aleph_api", boolType, defFalse),
	def("shared_cache", boolType, defFalse),
}}

var trustedExecution = &model{name: "TrustedExecutionEnvironment", extra: extraForbid, fields: []field{
	opt("firmware", itemHashType),
	def("policy", laxInt, json.Number("1")),
}}

var instanceEnvironment = &model{name: "InstanceEnvironment", extra: extraIgnore, fields: []field{
	def("internet", boolType, defFalse),
	def("aleph_api", boolType, defFalse),
	opt("hypervisor", enumType(string(HypervisorQEMU), string(HypervisorFirecracker))),
	{key: "trusted_execution", t: trustedExecution.typ(), nullable: true, check: checkTEE},
	def("reproducible", boolType, defFalse),
	def("shared_cache", boolType, defFalse),
}}

// checkTEE reproduces InstanceEnvironment.check_hypervisor. The reference
// tests the raw value's truthiness, so `trusted_execution: {}` slips past
// it with firecracker; here every TEE, empty or not, needs qemu.
func checkTEE(c *checker, p path, v any, siblings map[string]any) (any, bool) {
	if siblings["hypervisor"] != string(HypervisorQEMU) {
		c.fail(p, "Trusted Execution Environment is only supported for QEmu")
		return nil, false
	}
	return v, true
}

// programEnvironment is the union Union[FunctionEnvironment,
// InstanceEnvironment]: Pydantic's smart union picks InstanceEnvironment
// exactly when one of its own keys is present.
func programEnvironment(c *checker, p path, v any) (any, bool) {
	m, ok := v.(map[string]any)
	if !ok {
		c.fail(p, "must be an object, got %s", describe(v))
		return nil, false
	}
	_, hasHypervisor := m["hypervisor"]
	_, hasTEE := m["trusted_execution"]
	if hasHypervisor || hasTEE {
		return instanceEnvironment.validate(c, p, m)
	}
	return functionEnvironment.validate(c, p, m)
}

func executableBase(environment typ) []field {
	return append(baseContent(),
		req("allow_amend", boolType),
		opt("metadata", objectOf(MaxMetadataEntries)),
		opt("authorized_keys", listType(strType(MaxAuthorizedKeyLength), MaxAuthorizedKeys)),
		opt("variables", dictType(strType(MaxVariableKeyLength), strType(MaxVariableValueLength), MaxVariableEntries)),
		req("environment", environment),
		req("resources", machineResources.typ()),
		opt("payment", payment.typ()),
		opt("requirements", hostRequirements.typ()),
		def("volumes", listType(machineVolume, MaxVolumes), []any{}),
		opt("replaces", strType(MaxReplacesLength)),
	)
}

var codeContent = &model{name: "CodeContent", extra: extraIgnore, fields: []field{
	req("encoding", encodingType),
	req("entrypoint", anyString),
	req("ref", itemHashType),
	opt("interface", enumType(string(InterfaceASGI), string(InterfaceBinary))),
	opt("args", stringList),
	def("use_latest", boolType, defFalse),
}}

var functionRuntime = &model{name: "FunctionRuntime", extra: extraIgnore, fields: []field{
	req("ref", itemHashType),
	def("use_latest", boolType, defTrue),
	req("comment", anyString),
}}

var dataContent = &model{name: "DataContent", extra: extraIgnore, fields: []field{
	req("encoding", encodingType),
	req("mount", anyString),
	req("ref", itemHashType),
	{key: "use_latest", t: boolType, nullable: true, def: defFalse},
}}

var export = &model{name: "Export", extra: extraIgnore, fields: []field{
	req("encoding", encodingType),
	req("mount", anyString),
}}

var subscription = &model{name: "Subscription", extra: extraAllow, maxExtra: MaxSubscriptionEntries}

var functionTriggers = &model{name: "FunctionTriggers", extra: extraForbid, fields: []field{
	req("http", boolType),
	opt("message", listType(subscription.typ(), 0)),
	opt("persistent", boolType),
}}

var programContent = &model{name: "ProgramContent", extra: extraForbid, fields: append(executableBase(programEnvironment),
	req("type", literalString("vm-function")),
	req("code", codeContent.typ()),
	req("runtime", functionRuntime.typ()),
	opt("data", dataContent.typ()),
	opt("export", export.typ()),
	req("on", functionTriggers.typ()),
)}

var rootfsVolume = &model{name: "RootfsVolume", extra: extraIgnore, fields: []field{
	req("parent", parentVolume.typ()),
	req("persistence", enumType("host", "store")),
	req("size_mib", strictSize(MaxPersistentVolumeMiB)),
	opt("forgotten_by", stringList),
}}

var instanceContent = &model{
	name:   "InstanceContent",
	extra:  extraForbid,
	fields: append(executableBase(instanceEnvironment.typ()), req("rootfs", rootfsVolume.typ())),
	after:  checkInstanceRequirements,
}

// checkInstanceRequirements reproduces InstanceContent.check_requirements,
// which applies only when requirements are given, and stops at the first
// broken rule. Errors point at the field to fix rather than at the content.
func checkInstanceRequirements(c *checker, p path, obj map[string]any) {
	reqs, _ := obj["requirements"].(map[string]any)
	if reqs == nil {
		return
	}
	payType := ""
	if pay, ok := obj["payment"].(map[string]any); ok {
		payType, _ = pay["type"].(string)
	}
	paysByUse := payType == string(PaymentSuperfluid) || payType == string(PaymentCredit)
	node, _ := reqs["node"].(map[string]any)
	hasNodeHash := node != nil && node["node_hash"] != nil
	nodeHashPath := p.key("requirements").key("node").key("node_hash")
	env, _ := obj["environment"].(map[string]any)

	if paysByUse && !hasNodeHash {
		c.fail(nodeHashPath, "Node hash assignment is needed for PAYG or Credit payments")
		return
	}
	if gpus, _ := reqs["gpu"].([]any); len(gpus) > 0 {
		if !hasNodeHash {
			c.fail(nodeHashPath, "Node hash assignment is needed for GPU support")
			return
		}
		if env["hypervisor"] != string(HypervisorQEMU) {
			c.fail(p.key("environment").key("hypervisor"), "GPU option is only supported for QEmu hypervisor")
			return
		}
	}
	if node != nil && node["terms_and_conditions"] != nil {
		if !hasNodeHash {
			c.fail(nodeHashPath, "Terms_and_conditions field needs a requirements.node.node_hash value")
			return
		}
		if !paysByUse && env["trusted_execution"] == nil {
			c.fail(p.key("requirements").key("node").key("terms_and_conditions"),
				"Only PAYG/CoCo/Credit instances can have a terms_and_conditions")
		}
	}
}

var chainRef = &model{name: "ChainRef", extra: extraIgnore, fields: []field{
	req("chain", chainType),
	opt("channel", strType(MaxChannelLength)),
	req("item_content", anyString),
	req("item_hash", itemHashType),
	req("item_type", itemTypeType),
	req("sender", anyString),
	req("signature", anyString),
	req("time", anyFloat),
	def("type", literalString("POST"), "POST"),
}}

func stringOr(obj *model) typ {
	return func(c *checker, p path, v any) (any, bool) {
		if s, ok := v.(string); ok {
			return s, true
		}
		if _, ok := v.(map[string]any); ok {
			return obj.validate(c, p, v)
		}
		c.fail(p, "must be a string or an object, got %s", describe(v))
		return nil, false
	}
}

var postContent = &model{name: "PostContent", extra: extraForbid, fields: append(baseContent(),
	opt("content", anyType),
	opt("ref", stringOr(chainRef)),
	field{key: "type", t: anyString, required: true, check: func(c *checker, p path, v any, sib map[string]any) (any, bool) {
		if v == "amend" && isFalsy(sib["ref"]) {
			c.fail(p, "A 'ref' is required for POST type 'amend'")
			return nil, false
		}
		return v, true
	}},
)}

func isFalsy(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case string:
		return x == ""
	}
	return false
}

var aggregateKey = &model{name: "AggregateContentKey", extra: extraForbid, fields: []field{req("name", anyString)}}

var aggregateContent = &model{name: "AggregateContent", extra: extraForbid, fields: append(baseContent(),
	req("key", stringOr(aggregateKey)),
	req("content", objectOf(0)),
)}

var storeContent = &model{name: "StoreContent", extra: extraIgnore, fields: append(baseContent(),
	req("item_type", itemTypeType),
	req("item_hash", itemHashType),
	opt("size", laxInt),
	opt("content_type", anyString),
	opt("ref", anyString),
	opt("metadata", objectOf(0)),
	field{key: "payment", t: payment.typ(), nullable: true, check: func(c *checker, p path, v any, _ map[string]any) (any, bool) {
		if t := v.(map[string]any)["type"]; t != string(PaymentHold) && t != string(PaymentCredit) {
			c.fail(p, "Only 'hold' and 'credit' payment types are supported for store messages")
			return nil, false
		}
		return v, true
	}},
)}

var forgetContent = &model{name: "ForgetContent", extra: extraForbid, fields: append(baseContent(),
	req("hashes", listType(itemHashType, MaxForgetTargets)),
	def("aggregates", listType(itemHashType, MaxForgetTargets), []any{}),
	opt("reason", strType(MaxForgetReasonLength)),
)}

// contentModels maps each message type to the model of its content.
var contentModels = map[Type]*model{
	TypePost:      postContent,
	TypeAggregate: aggregateContent,
	TypeStore:     storeContent,
	TypeProgram:   programContent,
	TypeInstance:  instanceContent,
	TypeForget:    forgetContent,
}
