package api

import (
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// As root the tests run in a network namespace of their own: the status
// page's browser test runs chromium, which must reach nothing but the
// test's server.
func TestMain(m *testing.M) { testenv.RunIsolated(m) }
