// Package diagnostic runs the node's self-test of programs, as the
// reference's /status/check/fastapi does: it stores the node's own
// diagnostic program (examples/diagnostic) so that the check works on a
// fresh node, and checks each of its answers through the node's own
// /vm/<ref>/ route, as a client of the node would see them.
package diagnostic

import (
	"archive/zip"
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	diagsrc "github.com/alephvm/alephvm/examples/diagnostic"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/store"
)

// Targets are what the diagnostic program's network checks reach: the
// world a node is checked against. Empty fields keep the program's
// defaults (the reference's public targets).
type Targets struct {
	DNSName      string   // resolved by /dns, for an IPv4 and an IPv6 address
	IPv4URLs     []string // any one answering is IPv4 connectivity
	IPv6URLs     []string
	InternetURLs []string // any one answering is internet connectivity
	MessageHash  string   // read through the guest API by /messages and /get_a_message
}

func (t Targets) variables() map[string]string {
	v := map[string]string{"DIAG_STATE_DIR": StateMount}
	set := func(name, value string) {
		if value != "" {
			v[name] = value
		}
	}
	set("DIAG_DNS_NAME", t.DNSName)
	set("DIAG_IPV4_URLS", strings.Join(t.IPv4URLs, ","))
	set("DIAG_IPV6_URLS", strings.Join(t.IPv6URLs, ","))
	set("DIAG_INTERNET_URLS", strings.Join(t.InternetURLs, ","))
	set("DIAG_MESSAGE_HASH", t.MessageHash)
	return v
}

// StateMount is where the program's persistent volume is mounted, as in
// the reference's example.
const StateMount = "/var/lib/example"

// Store is what Deploy needs of the node's store.
type Store interface {
	AddFile(ctx context.Context, path string) (store.Added, error)
	AddMessage(ctx context.Context, raw []byte) (*message.Message, error)
}

// deployedAt is the time of the diagnostic program's messages: fixed, so
// that the same program, runtime and targets give the same ref on every
// start of every node.
var deployedAt = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// Deploy stores the diagnostic program with the given runtime and
// targets and returns its ref. Deploying it again with the same inputs
// gives the same ref and changes nothing.
func Deploy(ctx context.Context, s Store, runtime message.ItemHash, t Targets) (message.ItemHash, error) {
	code, err := zipSource()
	if err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp("", "alephvm-diagnostic-*.zip")
	if err != nil {
		return "", fmt.Errorf("diagnostic program: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(code)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("diagnostic program: %w", err)
	}
	added, err := s.AddFile(ctx, tmp.Name())
	if err != nil {
		return "", fmt.Errorf("store the diagnostic program's code: %w", err)
	}
	raw, err := programMessage(added.Ref, runtime, t)
	if err != nil {
		return "", err
	}
	msg, err := s.AddMessage(ctx, raw)
	if err != nil {
		return "", fmt.Errorf("store the diagnostic program's message: %w", err)
	}
	return msg.ItemHash, nil
}

// programMessage is the diagnostic program's PROGRAM message.
func programMessage(code, runtime message.ItemHash, t Targets) ([]byte, error) {
	asgi := message.Interface("asgi")
	persistence := message.PersistenceHost
	name, mount, comment := "diagnostic-state", StateMount, "the counter of /state/increment"
	raw, _, err := message.NewProgram(message.Header{Sender: store.LocalSender, Channel: "alephvm-local", Time: deployedAt},
		message.ProgramContent{
			ExecutableBase: message.ExecutableBase{
				Variables: t.variables(),
				Resources: message.MachineResources{VCPUs: 1, MemoryMiB: 256, Seconds: 30},
				Volumes: []message.MachineVolume{{
					Comment: &comment, Mount: &mount, Persistence: &persistence, Name: &name, SizeMiB: 16,
				}},
			},
			Type:        "vm-function",
			Environment: message.Environment{Internet: true, AlephAPI: true},
			Code:        message.CodeContent{Encoding: message.EncodingZip, Entrypoint: "main:app", Ref: code, Interface: &asgi},
			Runtime:     message.FunctionRuntime{Ref: runtime, Comment: "alephvm runtime"},
			On:          message.FunctionTriggers{HTTP: true},
		})
	if err != nil {
		return nil, fmt.Errorf("the diagnostic program's message: %w", err)
	}
	return raw, nil
}

// zipSource packs the program as a zip whose bytes depend on its source
// only.
func zipSource() ([]byte, error) {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	w, err := zw.CreateHeader(&zip.FileHeader{Name: "main.py", Method: zip.Deflate, Modified: deployedAt})
	if err == nil {
		_, err = w.Write(diagsrc.Source)
	}
	if cerr := zw.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("pack the diagnostic program: %w", err)
	}
	return buf.Bytes(), nil
}
