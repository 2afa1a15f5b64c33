package testenv

import (
	"net"
	"testing"
)

func TestMain(m *testing.M) { RunIsolated(m) }

func TestIsolatedNamespaceHasOnlyLoopback(t *testing.T) {
	RequireIsolatedRoot(t)
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	if len(ifaces) != 1 || ifaces[0].Name != "lo" || ifaces[0].Flags&net.FlagUp == 0 {
		t.Errorf("interfaces in the test namespace: %v", ifaces)
	}
}
