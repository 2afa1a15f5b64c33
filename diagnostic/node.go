package diagnostic

import (
	"context"
	"errors"
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

	mu     sync.Mutex
	last   Result
	lastAt time.Time
}

// CheckFastAPI implements the api's FastAPIChecker.
func (n *Node) CheckFastAPI(ctx context.Context, legacy, retro bool) ([]byte, bool) {
	ref := n.Ref
	if legacy {
		ref = n.LegacyRef
	}
	if ref == "" {
		return Result{Err: errors.New("this node has no legacy diagnostic program (LEGACY_CHECK_FASTAPI_VM_ID)")}.Body(), false
	}
	r := n.Checker.Run(ctx, ref, retro)
	if !legacy && !retro {
		n.mu.Lock()
		n.last, n.lastAt = r, time.Now()
		n.mu.Unlock()
	}
	return r.Body(), r.Passed
}

// Last returns the last full check of the diagnostic program and when it
// ended; ok is false before the first.
func (n *Node) Last() (r Result, at time.Time, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.last, n.lastAt, !n.lastAt.IsZero()
}
