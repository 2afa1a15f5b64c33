package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/diagnostic"
	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/hostinfo"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/selfcheck"
	"github.com/alephvm/alephvm/store"
)

// diagnosticNode is what /status/check/fastapi checks: the program
// CHECK_FASTAPI_VM_ID names, else the node's own, stored with the default
// runtime at the first check so that the check works on a fresh node. Its
// Checker's Node is set once the API listens.
func diagnosticNode(cfg config.Config, st *store.Store) *diagnostic.Node {
	n := &diagnostic.Node{
		Checker: &diagnostic.Checker{},
		Ref:     message.ItemHash(cfg.CheckFastAPIVMID), LegacyRef: message.ItemHash(cfg.LegacyCheckVMID),
	}
	if n.Ref != "" {
		return n
	}
	targets := diagnostic.Targets{
		DNSName: cfg.DiagnosticDNSName, IPv4URLs: cfg.DiagnosticIPv4URLs, IPv6URLs: cfg.DiagnosticIPv6URLs,
		InternetURLs: cfg.DiagnosticWebURLs, MessageHash: cfg.DiagnosticMessage,
	}
	n.Deploy = func(ctx context.Context) (message.ItemHash, error) {
		m, err := assets.Load(cfg.Assets())
		if err != nil {
			return "", fmt.Errorf("the default runtime (alephvm assets build): %w", err)
		}
		path, err := m.Path(assets.Runtime)
		if err != nil {
			return "", fmt.Errorf("the default runtime (alephvm assets build): %w", err)
		}
		runtime, err := st.AddFile(ctx, path)
		if err != nil {
			return "", fmt.Errorf("store the default runtime: %w", err)
		}
		return diagnostic.Deploy(ctx, st, runtime.Ref, targets)
	}
	return n
}

// selfChecks gives the status page the last result of the node's
// self-checks.
type selfChecks struct {
	diag *diagnostic.Node
	host *selfcheck.Checker
}

func (s selfChecks) CheckResults(context.Context) []api.CheckResult {
	var results []api.CheckResult
	if body, passed, at, ok := s.host.Last(); ok {
		results = append(results, api.CheckResult{Name: "host (connectivity)", Passed: passed, Detail: string(body), CheckedAt: at})
	}
	r, at, ok := s.diag.Last()
	if !ok {
		return results
	}
	detail := "every check passed"
	switch {
	case r.Err != nil:
		detail = r.Err.Error()
	case !r.Passed:
		detail = "failed: " + strings.Join(r.Failed(), ", ")
	}
	return append(results, api.CheckResult{Name: "fastapi (the diagnostic program)", Passed: r.Passed, Detail: detail, CheckedAt: at})
}

// nodeInfo feeds the status routes from the host and the settings.
type nodeInfo struct {
	cfg        config.Config
	volumesDir string
	disks      *diskusage.Ledger
	qemu       bool
}

func (n nodeInfo) Host() (hostinfo.Host, error) { return hostinfo.Reader{}.Read() }

// Disk is the VMs' filesystem; what is available is what the disk ledger
// would still promise a new VM (the same count as its 507 refusals).
func (n nodeInfo) Disk() (hostinfo.Disk, error) {
	total, err := hostinfo.DiskTotal(n.volumesDir)
	if err != nil {
		return hostinfo.Disk{}, err
	}
	available, err := n.disks.Available()
	if err != nil {
		return hostinfo.Disk{}, err
	}
	return hostinfo.Disk{Total: total, Available: available}, nil
}

func (n nodeInfo) PublicConfig() api.PublicConfig {
	c := n.cfg
	return api.PublicConfig{
		DomainName: c.DomainName, NodeHash: c.NodeHash, APIServer: c.APIServer, CheckFastAPIVMID: c.CheckFastAPIVMID,
		UseJailer: c.UseJailer, UseDeveloperSSHKeys: len(c.DeveloperSSHKeys) > 0,
		IPv6AddressPool: c.IPv6AddressPool, IPv6Forwarding: c.IPv6AddressPool != "", UseNDPProxy: c.UseNDPProxy,
		InstanceDefaultHypervisor: c.InstanceHypervisor, QEMU: n.qemu,
	}
}

// hostChecker is /status/check/host and /ipv6, against the CONNECTIVITY_*
// settings; the VM's IPv6 is the diagnostic program's. Names are resolved
// by the servers guests are given when DNS_NAMESERVERS names them (what
// the VMs can resolve is what matters), else by the host's resolver.
func hostChecker(cfg config.Config, diag *diagnostic.Node) *selfcheck.Checker {
	c := &selfcheck.Checker{
		Targets: selfcheck.Targets{IPv4URL: cfg.ConnectivityIPv4, IPv6URL: cfg.ConnectivityIPv6, DNSHostname: cfg.ConnectivityDNS,
			Domain: cfg.DomainName, HTTPURLs: cfg.ConnectivityHTTP},
		VMIPv6: diag.IPv6,
	}
	if len(cfg.DNSNameservers) > 0 {
		server := net.JoinHostPort(cfg.DNSNameservers[0], "53")
		c.Resolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, server)
		}}
	}
	return c
}

// nodeFacts are what messages' requirements are checked against: the
// node's hash and its host's CPU.
func nodeFacts(cfg config.Config, log *slog.Logger) execution.Node {
	n := execution.Node{Hash: cfg.NodeHash}
	h, err := hostinfo.Reader{}.Read()
	if err != nil {
		log.Warn("read the host's CPU: messages that require one are refused", "err", err)
		return n
	}
	n.Arch, n.Vendor, n.Features = h.Arch, h.Vendor, h.Features
	return n
}

// loginToken makes the token of the /about pages for this run of the
// node, written to EXECUTION_ROOT/login_token (0600) for the operator.
func loginToken(cfg config.Config) (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	token := hex.EncodeToString(b)
	path := filepath.Join(cfg.ExecutionRoot, "login_token")
	if err := os.WriteFile(path+".tmp", []byte(token+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write the login token: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return "", fmt.Errorf("write the login token: %w", err)
	}
	return token, nil
}

// secretSettings are not shown by /about/config.
var secretSettings = map[string]bool{"ALLOCATION_TOKEN": true}

// settingsOf is every setting by its environment name, as /about/config
// shows them.
func settingsOf(cfg config.Config) func() map[string]string {
	return func() map[string]string {
		out := map[string]string{}
		for _, s := range config.Settings() {
			v := s.Value(cfg)
			if secretSettings[s.Key] && v != "" {
				v = "(set)"
			}
			out[s.Env] = v
		}
		return out
	}
}
