package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/alephvm/alephvm/api"
	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/diagnostic"
	"github.com/alephvm/alephvm/message"
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
type selfChecks struct{ diag *diagnostic.Node }

func (s selfChecks) CheckResults(context.Context) []api.CheckResult {
	r, at, ok := s.diag.Last()
	if !ok {
		return nil
	}
	detail := "every check passed"
	switch {
	case r.Err != nil:
		detail = r.Err.Error()
	case !r.Passed:
		detail = "failed: " + strings.Join(r.Failed(), ", ")
	}
	return []api.CheckResult{{Name: "fastapi (the diagnostic program)", Passed: r.Passed, Detail: detail, CheckedAt: at}}
}
