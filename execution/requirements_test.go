package execution

import (
	"errors"
	"strings"
	"testing"

	"github.com/alephvm/alephvm/message"
)

func TestCheckRequirements(t *testing.T) {
	node := Node{Hash: strings.Repeat("ab", 32), Arch: "x86_64", Vendor: "AuthenticAMD", Features: []string{"sev"}}
	hash := func(s string) *message.ItemHash { h := message.ItemHash(s); return &h }
	str := func(s string) *string { return &s }
	for _, tc := range []struct {
		name   string
		req    *message.HostRequirements
		env    message.Environment
		node   Node
		status int
		msg    string
	}{
		{name: "none", node: node},
		{name: "this node", req: &message.HostRequirements{Node: &message.NodeRequirements{NodeHash: hash(strings.Repeat("AB", 32))}}, node: node},
		{name: "another node", req: &message.HostRequirements{Node: &message.NodeRequirements{NodeHash: hash(strings.Repeat("cd", 32))}}, node: node, status: 400, msg: "pinned to node cdcd"},
		{name: "a node that does not know its hash", req: &message.HostRequirements{Node: &message.NodeRequirements{NodeHash: hash(strings.Repeat("cd", 32))}}, status: 503, msg: "NODE_HASH"},
		{name: "owner only", req: &message.HostRequirements{Node: &message.NodeRequirements{Owner: str("0x1")}}, node: node},
		{name: "gpu", req: &message.HostRequirements{GPU: []message.GPUProperties{{Vendor: "NVIDIA"}}}, node: node, status: 503, msg: "GPU"},
		{name: "confidential", env: message.Environment{TrustedExecution: &message.TrustedExecutionEnvironment{Policy: 1}}, node: node, status: 503, msg: "trusted_execution"},
		{name: "cpu as the host's", req: &message.HostRequirements{CPU: &message.CPUProperties{Architecture: str("x86_64"), Vendor: str("AuthenticAMD"), Features: []string{"sev"}}}, node: node},
		{name: "another architecture", req: &message.HostRequirements{CPU: &message.CPUProperties{Architecture: str("arm64")}}, node: node, status: 503, msg: "arm64 CPU"},
		{name: "another vendor", req: &message.HostRequirements{CPU: &message.CPUProperties{Vendor: str("GenuineIntel")}}, node: node, status: 503, msg: "GenuineIntel"},
		{name: "a missing feature", req: &message.HostRequirements{CPU: &message.CPUProperties{Features: []string{"sev_snp"}}}, node: node, status: 503, msg: "sev_snp"},
	} {
		err := CheckRequirements(message.ExecutableBase{Requirements: tc.req}, tc.env, tc.node)
		var e *Error
		switch {
		case tc.status == 0 && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
		case tc.status != 0 && (!errors.As(err, &e) || e.Status != tc.status || !strings.Contains(e.Msg, tc.msg)):
			t.Errorf("%s: %v, want %d %q", tc.name, err, tc.status, tc.msg)
		}
	}
}
