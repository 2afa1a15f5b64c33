package db

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
)

func TestOpenMigratesOnceAndReopens(t *testing.T) {
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	path := Path(filepath.Join(t.TempDir(), "state"))
	for range 2 {
		db, err := Open(ctx, path, log)
		if err != nil {
			t.Fatal(err)
		}
		var mode string
		if err := db.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
			t.Errorf("journal_mode = %q, %v", mode, err)
		}
		var fk int
		if err := db.QueryRowContext(ctx, "PRAGMA foreign_keys").Scan(&fk); err != nil || fk != 1 {
			t.Errorf("foreign_keys = %d, %v", fk, err)
		}
		if _, err := db.ExecContext(ctx, "SELECT item_hash FROM store_files"); err != nil {
			t.Errorf("schema: %v", err)
		}
		db.Close()
	}
}
