// Package execution holds what every VM's life shares: the records the
// node keeps of its executions, the errors a client can act on, the
// hypervisor backends as programs and instances use them, and the kernel
// directly booted VMs boot. Package program launches programs; package
// instance runs instances.
package execution

import (
	"context"
	"errors"
	"fmt"
	"regexp"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
	"github.com/alephvm/alephvm/store"
)

// Store is the content store as executions use it.
type Store interface {
	Message(ctx context.Context, hash message.ItemHash) (*message.Message, []byte, error)
	Fetch(ctx context.Context, ref message.ItemHash, useLatest bool) (*store.Item, error)
	// Resolve names the STORE message of ref (its latest amend with
	// useLatest) without downloading its file.
	Resolve(ctx context.Context, ref message.ItemHash, useLatest bool) (*message.Message, error)
}

// Networks attaches VMs to the network.
type Networks interface {
	Attach(req network.AttachRequest) (network.Attachment, error)
	Detach(owner string) error
}

// Error is a failure a client can act on, with the HTTP status it
// deserves.
type Error struct {
	Status int
	Msg    string
	Err    error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// HTTPStatus implements api.StatusError.
func (e *Error) HTTPStatus() int { return e.Status }

// StoreError turns the store's errors into ones the API can answer.
func StoreError(what string, ref message.ItemHash, err error) error {
	switch {
	case errors.Is(err, store.ErrNotFound):
		return &Error{Status: 404, Msg: fmt.Sprintf("%s %s not found", what, ref), Err: err}
	case errors.Is(err, store.ErrNotStore), errors.Is(err, store.ErrInvalidMessage), errors.Is(err, store.ErrTooLarge):
		return &Error{Status: 400, Msg: fmt.Sprintf("%s %s is not usable", what, ref), Err: err}
	case errors.Is(err, store.ErrInsufficientStorage):
		return &Error{Status: 507, Msg: fmt.Sprintf("%s %s cannot be stored: the node is short of disk space", what, ref), Err: err}
	case errors.Is(err, store.ErrRemoteUnavailable):
		return &Error{Status: 503, Msg: fmt.Sprintf("%s %s cannot be fetched now", what, ref), Err: err}
	}
	return fmt.Errorf("%s %s: %w", what, ref, err)
}

// SafeName matches what may not stand in a volume's file name.
var SafeName = regexp.MustCompile(`[^A-Za-z0-9_-]`)
