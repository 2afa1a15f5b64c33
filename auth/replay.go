package auth

import (
	"context"
	"database/sql"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// replays remembers the signed payloads accepted until they expire.
type replays interface {
	// remember records key until expires and reports whether it was new:
	// false when an unexpired record of it exists.
	remember(ctx context.Context, key []byte, now, expires time.Time) (bool, error)
}

// memoryReplays keeps them in memory, for a node without a database, at
// most max of them: past it, the expired go first, then any.
type memoryReplays struct {
	mu   sync.Mutex
	max  int
	seen map[string]time.Time
}

func newMemoryReplays(max int) *memoryReplays {
	return &memoryReplays{max: max, seen: map[string]time.Time{}}
}

func (m *memoryReplays) remember(_ context.Context, key []byte, now, expires time.Time) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if exp, ok := m.seen[string(key)]; ok && now.Before(exp) {
		return false, nil
	}
	if len(m.seen) >= m.max {
		for k, exp := range m.seen {
			if !now.Before(exp) {
				delete(m.seen, k)
			}
		}
		for k := range m.seen {
			if len(m.seen) < m.max {
				break
			}
			delete(m.seen, k)
		}
	}
	m.seen[string(key)] = expires
	return true, nil
}

func (m *memoryReplays) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.seen)
}

// dbReplays keeps them in the node's database (table auth_replays), so
// that they survive a restart. Expired records are deleted at each
// insertion: the table holds the calls of one time window at most.
type dbReplays struct{ db *sql.DB }

func (d dbReplays) remember(ctx context.Context, key []byte, now, expires time.Time) (bool, error) {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("replay cache: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `DELETE FROM auth_replays WHERE expires_at <= ?`, now.UnixNano()); err != nil {
		return false, fmt.Errorf("replay cache: %w", err)
	}
	res, err := tx.ExecContext(ctx, `INSERT INTO auth_replays (payload_sha256, expires_at) VALUES (?, ?) ON CONFLICT DO NOTHING`, key, expires.UnixNano())
	if err != nil {
		return false, fmt.Errorf("replay cache: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("replay cache: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("replay cache: %w", err)
	}
	return n == 1, nil
}

func replayCacheError(err error) *Error {
	return &Error{Status: http.StatusServiceUnavailable, Reason: err.Error()}
}
