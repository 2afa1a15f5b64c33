// Package teststore opens, for a test, the node's database and content
// store in a directory of the test's own.
package teststore

import (
	"context"
	"database/sql"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/store"
)

// Open opens the database and the store in dir, closed when the test ends.
func Open(t testing.TB, dir string) (*store.Store, *sql.DB) {
	t.Helper()
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	database, err := db.Open(ctx, filepath.Join(dir, "node.sqlite3"), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { database.Close() })
	st, err := store.Open(ctx, store.Options{Root: filepath.Join(dir, "cache"), DB: database, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	return st, database
}
