package storage

import (
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func TestMain(m *testing.M) { testenv.RunIsolated(m) }
