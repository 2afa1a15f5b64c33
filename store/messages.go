package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/alephvm/alephvm/message"
)

// AddMessage validates a message and keeps it, marked local: created or
// handed to this node rather than fetched from the network. Its signature
// is not checked. Adding a message already kept changes nothing.
func (s *Store) AddMessage(ctx context.Context, raw []byte) (*message.Message, error) {
	msg, err := message.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidMessage, err)
	}
	if err := s.saveMessage(ctx, msg, raw, true); err != nil {
		return nil, err
	}
	return msg, nil
}

// Message returns a message and its JSON as received: from the database,
// else from the API server, whose answer is validated, checked to carry the
// hash asked for, and kept.
func (s *Store) Message(ctx context.Context, hash message.ItemHash) (*message.Message, []byte, error) {
	if _, err := message.ParseItemHash(string(hash)); err != nil {
		return nil, nil, fmt.Errorf("message %q: %w: %w", hash, ErrNotFound, err)
	}
	var raw []byte
	err := s.db.QueryRowContext(ctx, `SELECT raw FROM store_messages WHERE item_hash = ?`, hash).Scan(&raw)
	switch {
	case err == nil:
		msg, err := message.Parse(raw)
		if err != nil {
			return nil, nil, fmt.Errorf("message %s kept in the database: %w: %w", hash, ErrInvalidMessage, err)
		}
		return msg, raw, nil
	case !errors.Is(err, sql.ErrNoRows):
		return nil, nil, fmt.Errorf("look up message %s: %w", hash, err)
	case s.remote == nil || s.remote.api == "":
		return nil, nil, fmt.Errorf("message %s: %w (no API server is configured)", hash, ErrNotFound)
	}
	// Callers asking at once share one request; the message is then local.
	err = s.flights.do(ctx, "message "+string(hash), func(ctx context.Context) error {
		var raw []byte
		err := s.retry(ctx, "ask the API", s.messageAttempts(), func(ctx context.Context) error {
			var err error
			raw, err = s.remote.message(ctx, hash)
			return err
		})
		if err != nil {
			return err
		}
		msg, err := message.Parse(raw)
		if err != nil {
			return fmt.Errorf("from %s: %w: %w", s.remote.api, ErrInvalidMessage, err)
		}
		if msg.ItemHash != hash {
			return fmt.Errorf("from %s: %w: the API answered with message %s", s.remote.api, ErrHashMismatch, msg.ItemHash)
		}
		return s.saveMessage(ctx, msg, raw, false)
	})
	if err != nil {
		return nil, nil, fmt.Errorf("message %s: %w", hash, err)
	}
	return s.Message(ctx, hash)
}

// latest resolves use_latest as the reference does: the newest STORE
// message by the same owner (content.address, not the signer) whose
// content.ref is the original's hash, else the original. Amends kept
// locally and those the API server knows are both considered.
func (s *Store) latest(ctx context.Context, orig *message.Message) (*message.Message, error) {
	owner := orig.Content.(*message.StoreContent).Address
	best := orig
	var raw []byte
	err := s.db.QueryRowContext(ctx, `SELECT raw FROM store_messages
		WHERE type = 'STORE' AND ref = ? AND address = ? ORDER BY time DESC LIMIT 1`, orig.ItemHash, owner).Scan(&raw)
	switch {
	case err == nil:
		if best, err = message.Parse(raw); err != nil {
			return nil, fmt.Errorf("amend of %s kept in the database: %w: %w", orig.ItemHash, ErrInvalidMessage, err)
		}
	case !errors.Is(err, sql.ErrNoRows):
		return nil, fmt.Errorf("look up amends of %s: %w", orig.ItemHash, err)
	}
	if s.remote == nil || s.remote.api == "" {
		return best, nil
	}
	raw = nil
	err = s.retry(ctx, "ask the API for amends of "+string(orig.ItemHash), s.messageAttempts(), func(ctx context.Context) error {
		var err error
		raw, err = s.remote.latestAmend(ctx, orig.ItemHash, owner)
		return err
	})
	if err != nil || raw == nil {
		return best, err
	}
	amend, err := message.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("amend of %s from %s: %w: %w", orig.ItemHash, s.remote.api, ErrInvalidMessage, err)
	}
	c, ok := amend.Content.(*message.StoreContent)
	if !ok || c.Address != owner || c.Ref == nil || *c.Ref != string(orig.ItemHash) {
		// The reference ignores an answer that does not match the query.
		s.log.Warn("ignoring an amend that does not amend the message", "ref", orig.ItemHash, "amend", amend.ItemHash)
		return best, nil
	}
	if err := s.saveMessage(ctx, amend, raw, false); err != nil {
		return nil, err
	}
	if best == orig || amend.Time.After(best.Time) {
		best = amend
	}
	return best, nil
}

// saveMessage keeps a validated message; a message already kept is left
// as it is.
func (s *Store) saveMessage(ctx context.Context, msg *message.Message, raw []byte, local bool) error {
	var address string
	var ref, fileHash *string
	switch c := msg.Content.(type) {
	case *message.StoreContent:
		address, ref = c.Address, c.Ref
		h := string(c.ItemHash)
		fileHash = &h
	case message.ExecutableContent:
		address = c.Executable().Address
	case *message.PostContent:
		address = c.Address
	case *message.AggregateContent:
		address = c.Address
	case *message.ForgetContent:
		address = c.Address
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO store_messages
		(item_hash, type, sender, address, ref, file_hash, time, local, raw, stored_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (item_hash) DO NOTHING`,
		msg.ItemHash, msg.Type, msg.Sender, address, ref, fileHash,
		float64(msg.Time.UnixMicro())/1e6, local, raw, time.Now().UnixNano())
	if err != nil {
		return fmt.Errorf("keep message %s: %w", msg.ItemHash, err)
	}
	return nil
}

// messageAttempts bounds the tries of a message request: a caller is
// waiting for the answer, and a message is no large transfer that a flaky
// link needs many tries for.
func (s *Store) messageAttempts() int { return min(s.opts.Attempts, 3) }

// EachMessage calls fn with every message of type typ the store keeps, as
// received, oldest first.
func (s *Store) EachMessage(ctx context.Context, typ message.Type, fn func(raw []byte) error) error {
	rows, err := s.db.QueryContext(ctx, `SELECT raw FROM store_messages WHERE type = ? ORDER BY time`, string(typ))
	if err != nil {
		return fmt.Errorf("list %s messages: %w", typ, err)
	}
	defer rows.Close()
	for rows.Next() {
		var raw []byte
		if err := rows.Scan(&raw); err != nil {
			return fmt.Errorf("list %s messages: %w", typ, err)
		}
		if err := fn(raw); err != nil {
			return err
		}
	}
	return rows.Err()
}
