package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"time"

	"github.com/alephvm/alephvm/message"
)

// remote speaks to an Aleph core node's HTTP API and an IPFS gateway.
type remote struct {
	api, gateway string // without a trailing slash; "" when not configured
	client       *http.Client
	timeout      time.Duration // for one message request
}

// permanentError marks a failure that retrying cannot mend.
type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }
func (e permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return permanentError{err} }

// message fetches one message as the API serves it.
func (r *remote) message(ctx context.Context, hash message.ItemHash) ([]byte, error) {
	var answer struct {
		Status   string            `json:"status"`
		Message  json.RawMessage   `json:"message"`
		Messages []json.RawMessage `json:"messages"`
	}
	if err := r.getJSON(ctx, r.api+"/api/v0/messages/"+url.PathEscape(string(hash)), &answer); err != nil {
		return nil, err
	}
	switch answer.Status {
	case "processed", "pending", "":
	default: // forgotten, rejected, removing, removed: nothing to run
		return nil, permanent(fmt.Errorf("message %s is %s on %s: %w", hash, answer.Status, r.api, ErrNotFound))
	}
	switch {
	case len(answer.Message) > 0 && string(answer.Message) != "null":
		return answer.Message, nil
	case len(answer.Messages) > 0:
		return answer.Messages[0], nil
	}
	return nil, permanent(fmt.Errorf("message %s: %w (the API's answer holds no message)", hash, ErrNotFound))
}

// latestAmend returns the newest STORE message by owner that amends hash,
// as the reference asks for it, or nil when there is none.
func (r *remote) latestAmend(ctx context.Context, hash message.ItemHash, owner string) ([]byte, error) {
	q := url.Values{"msgType": {"STORE"}, "sort_order": {"-1"}, "refs": {string(hash)}, "owners": {owner}}
	var page struct {
		Messages []json.RawMessage `json:"messages"`
	}
	if err := r.getJSON(ctx, r.api+"/api/v0/messages.json?"+q.Encode(), &page); err != nil {
		return nil, err
	}
	if len(page.Messages) == 0 {
		return nil, nil
	}
	return page.Messages[0], nil
}

func (r *remote) getJSON(ctx context.Context, u string, into any) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return permanent(err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrRemoteUnavailable, err)
	}
	defer resp.Body.Close()
	if err := statusError(resp, u); err != nil {
		return err
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, 2*message.MaxMessageSize))
	if err != nil {
		return fmt.Errorf("%w: read %s: %w", ErrRemoteUnavailable, u, err)
	}
	if err := json.Unmarshal(data, into); err != nil {
		return permanent(fmt.Errorf("%w: %s answered something that is not the JSON expected: %w", ErrRemoteUnavailable, u, err))
	}
	return nil
}

// statusError turns an unsuccessful answer into an error: permanent for
// 404 and the other client errors, retryable for server errors and 429.
func statusError(resp *http.Response, u string) error {
	switch code := resp.StatusCode; {
	case code == http.StatusOK || code == http.StatusPartialContent:
		return nil
	case code == http.StatusNotFound:
		return permanent(fmt.Errorf("%s: %w", u, ErrNotFound))
	case code == http.StatusTooManyRequests || code >= 500:
		return fmt.Errorf("%w: %s: %s", ErrRemoteUnavailable, u, resp.Status)
	default:
		return permanent(fmt.Errorf("%w: %s: %s", ErrRemoteUnavailable, u, resp.Status))
	}
}

// fileURL is where a STORE message's file is served: the gateway for IPFS
// items, the API's raw storage otherwise.
func (r *remote) fileURL(c *message.StoreContent) (string, error) {
	if c.ItemType == message.ItemIPFS {
		if r.gateway == "" {
			return "", fmt.Errorf("IPFS item %s: %w (no IPFS gateway is configured)", c.ItemHash, ErrNotFound)
		}
		return r.gateway + "/" + string(c.ItemHash), nil
	}
	if r.api == "" {
		return "", fmt.Errorf("file %s: %w (no API server is configured)", c.ItemHash, ErrNotFound)
	}
	return r.api + "/api/v0/storage/raw/" + string(c.ItemHash), nil
}

// retry runs fn until it succeeds, fails permanently, ctx ends or
// attempts are spent, waiting longer between tries (Options.Backoff
// doubling up to 30 s, with jitter).
func (s *Store) retry(ctx context.Context, what string, attempts int, fn func(context.Context) error) error {
	for attempt := 1; ; attempt++ {
		err := fn(ctx)
		var perm permanentError
		switch {
		case err == nil:
			return nil
		case ctx.Err() != nil:
			return fmt.Errorf("%s: %w", what, context.Cause(ctx))
		case errors.As(err, &perm):
			return fmt.Errorf("%s: %w", what, perm.err)
		case attempt >= attempts:
			return fmt.Errorf("%s: gave up after %d attempts: %w", what, attempt, err)
		}
		wait := min(s.opts.Backoff<<min(attempt-1, 6), 30*time.Second)
		wait = wait/2 + rand.N(wait/2+1)
		s.log.Warn("retrying", "what", what, "attempt", attempt, "in", wait.Round(time.Millisecond), "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, context.Cause(ctx))
		case <-time.After(wait):
		}
	}
}
