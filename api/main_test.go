package api

import (
	"log"
	"net/http"
	"os"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

// As root the tests run in a network namespace of their own: the status
// page's browser test runs chromium, which must reach nothing but the
// test's server. Started with ALEPHVM_PROXYBENCH_PROGRAM, the test binary
// is instead the small program of BenchmarkProxyVsNginx, in a process of
// its own.
func TestMain(m *testing.M) {
	if addr := os.Getenv(programAddrEnv); addr != "" {
		log.Fatal(http.ListenAndServe(addr, smallProgram()))
	}
	testenv.RunIsolated(m)
}
