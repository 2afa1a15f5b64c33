package execution

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/alephvm/alephvm/message"
)

// Node is what a message's requirements are checked against: this node's
// identity and what its host can give.
type Node struct {
	// Hash is the node's hash on the network (NODE_HASH); empty when the
	// operator did not set it.
	Hash string
	// Arch, Vendor and Features are the host CPU's, as aleph-message names
	// them (x86_64, AuthenticAMD, sev...).
	Arch, Vendor string
	Features     []string
}

// CheckRequirements refuses, before anything is fetched or reserved, an
// execution this node cannot run as its message asks: pinned to another
// node (400), pinned to a node hash when this node does not know its own,
// needing a GPU, confidential computing or a CPU the host does not have
// (503: another node may). A nil error means the node can honour it.
func CheckRequirements(base message.ExecutableBase, env message.Environment, node Node) error {
	if env.TrustedExecution != nil {
		return &Error{Status: 503, Msg: "confidential computing (environment.trusted_execution) is not available on this node"}
	}
	r := base.Requirements
	if r == nil {
		return nil
	}
	if len(r.GPU) > 0 {
		return &Error{Status: 503, Msg: fmt.Sprintf("the message asks for %d GPU(s): this node has none to give", len(r.GPU))}
	}
	if r.Node != nil && r.Node.NodeHash != nil {
		want := string(*r.Node.NodeHash)
		switch {
		case node.Hash == "":
			return &Error{Status: 503, Msg: fmt.Sprintf("the message is pinned to node %s, and this node does not know its own hash (NODE_HASH)", want)}
		case !strings.EqualFold(want, node.Hash):
			return &Error{Status: 400, Msg: fmt.Sprintf("the message is pinned to node %s: this is node %s", want, node.Hash)}
		}
	}
	if cpu := r.CPU; cpu != nil {
		if cpu.Architecture != nil && *cpu.Architecture != node.Arch {
			return &Error{Status: 503, Msg: fmt.Sprintf("the message asks for a %s CPU: this node's is %s", *cpu.Architecture, cmp.Or(node.Arch, "another architecture"))}
		}
		if cpu.Vendor != nil && *cpu.Vendor != node.Vendor {
			return &Error{Status: 503, Msg: fmt.Sprintf("the message asks for a CPU by %s: this node's is by %s", *cpu.Vendor, cmp.Or(node.Vendor, "another vendor"))}
		}
		for _, f := range cpu.Features {
			if !slices.Contains(node.Features, f) {
				return &Error{Status: 503, Msg: fmt.Sprintf("the message asks for the CPU feature %s, which this node does not have", f)}
			}
		}
	}
	return nil
}
