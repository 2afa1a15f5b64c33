// Package db owns the node's single SQLite database: where it lives, how it
// is opened (WAL, a busy timeout, foreign keys) and its schema, built by the
// numbered goose migrations in db/migrations. Every package that keeps
// state adds its tables there as a new migration file and receives the
// *sql.DB from main.
package db

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"

	"github.com/pressly/goose/v3"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// FileName is the database's file name under the node's EXECUTION_ROOT.
const FileName = "alephvm.sqlite3"

//go:embed migrations/*.sql
var migrations embed.FS

// Path returns where the database of a node whose EXECUTION_ROOT is
// executionRoot lives.
func Path(executionRoot string) string { return filepath.Join(executionRoot, FileName) }

// Open opens (creating it and its directory if needed) the database at path
// and brings its schema up to date.
func Open(ctx context.Context, path string, log *slog.Logger) (*sql.DB, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create database directory: %w", err)
	}
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "busy_timeout(10000)", "foreign_keys(ON)", "synchronous(NORMAL)"} {
		q.Add("_pragma", p)
	}
	// Writers take the lock when their transaction begins, so that two
	// transactions never both read and then deadlock upgrading to write.
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	if err := migrate(ctx, db, log); err != nil {
		db.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	return db, nil
}

func migrate(ctx context.Context, db *sql.DB, log *slog.Logger) error {
	files, err := fs.Sub(migrations, "migrations")
	if err != nil {
		return err
	}
	p, err := goose.NewProvider(goose.DialectSQLite3, db, files, goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return fmt.Errorf("load migrations: %w", err)
	}
	results, err := p.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	for _, r := range results {
		log.Info("database migrated", "version", r.Source.Version, "file", r.Source.Path, "took", r.Duration)
	}
	return nil
}
