// Package logging builds the node's slog logger.
package logging

import (
	"fmt"
	"io"
	"log/slog"
)

// New returns a logger writing to w in format "text" or "json" at level
// and above.
func New(w io.Writer, format string, level slog.Level) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: level}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format must be text or json, got %q", format)
}
