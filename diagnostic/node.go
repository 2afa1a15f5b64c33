package diagnostic

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/alephvm/alephvm/message"
)

// Node is the node's diagnostic: which programs it checks, and the last
// result, for the status page.
type Node struct {
	Checker *Checker
	// Ref is the diagnostic program (CHECK_FASTAPI_VM_ID, or the node's
	// own); LegacyRef the legacy one (LEGACY_CHECK_FASTAPI_VM_ID), empty
	// when the node has none.
	Ref, LegacyRef message.ItemHash
	// Deploy, when Ref is empty, stores the node's own diagnostic program
	// and returns its ref; it runs at the first check (and again after a
	// failure), not at the node's start.
	Deploy func(context.Context) (message.ItemHash, error)

	deploy sync.Mutex
	mu     sync.Mutex
	last   Result
	lastAt time.Time
}

// CheckFastAPI implements the api's FastAPIChecker.
func (n *Node) CheckFastAPI(ctx context.Context, legacy, retro bool) ([]byte, bool) {
	ref, err := n.ref(ctx)
	if legacy {
		ref, err = n.LegacyRef, nil
		if ref == "" {
			err = errors.New("this node has no legacy diagnostic program (LEGACY_CHECK_FASTAPI_VM_ID)")
		}
	}
	if err != nil {
		return Result{Err: err}.Body(), false
	}
	r := n.Checker.Run(ctx, ref, retro)
	if !legacy && !retro {
		n.mu.Lock()
		n.last, n.lastAt = r, time.Now()
		n.mu.Unlock()
	}
	return r.Body(), r.Passed
}

// ref is the diagnostic program, deployed at the first call when the
// node runs its own.
func (n *Node) ref(ctx context.Context) (message.ItemHash, error) {
	n.deploy.Lock()
	defer n.deploy.Unlock()
	if n.Ref != "" || n.Deploy == nil {
		if n.Ref == "" {
			return "", errors.New("this node has no diagnostic program (CHECK_FASTAPI_VM_ID)")
		}
		return n.Ref, nil
	}
	ref, err := n.Deploy(ctx)
	if err != nil {
		return "", fmt.Errorf("deploy the node's diagnostic program: %w", err)
	}
	n.Ref = ref
	return ref, nil
}

// Last returns the last full check of the diagnostic program and when it
// ended; ok is false before the first.
func (n *Node) Last() (r Result, at time.Time, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.last, n.lastAt, !n.lastAt.IsZero()
}

// IPv6 reports whether the diagnostic program reaches its IPv6 targets
// (/ip/6), for /status/check/ipv6.
func (n *Node) IPv6(ctx context.Context) bool {
	ref, err := n.ref(ctx)
	if err != nil {
		return false
	}
	p := probe{c: n.Checker, ctx: ctx, base: strings.TrimSuffix(n.Checker.Node, "/") + "/vm/" + string(ref)}
	return p.result("/ip/6")
}
