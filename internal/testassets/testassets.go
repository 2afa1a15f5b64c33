// Package testassets builds, once per test cache, the images VM tests
// boot. Building them needs the network (apt), which tests in their own
// network namespace do not have: TestMain calls Prepare before
// testenv.RunIsolated, and the tests read the outcome with BaseImage.
package testassets

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/alephvm/alephvm/baseimage"
	"github.com/alephvm/alephvm/internal/testenv"
)

const (
	baseDirEnv = "ALEPHVM_TEST_BASE_IMAGE_DIR"
	baseErrEnv = "ALEPHVM_TEST_BASE_IMAGE_ERROR"
)

// Prepare builds the base image into the test cache when the tests will
// boot VMs: as root, outside the isolated namespace, not in -short mode.
// Call it from TestMain after flag.Parse.
func Prepare() {
	if os.Geteuid() != 0 || testenv.Isolated() || testing.Short() || os.Getenv(baseDirEnv) != "" {
		return
	}
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		os.Setenv(baseErrEnv, "needs mmdebstrap, which is not installed (see scripts/test.sh)")
		return
	}
	dir := filepath.Join(testenv.CachePath(), "base-image")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	var out bytes.Buffer
	if _, err := baseimage.Build(ctx, dir, &out, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		os.Setenv(baseErrEnv, fmt.Sprintf("%v\n%s", err, out.String()))
		return
	}
	os.Setenv(baseDirEnv, dir)
}

// BaseImage returns the base image Prepare built, failing the test if the
// build failed and skipping it where VMs are not booted.
func BaseImage(t testing.TB) baseimage.Image {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs: not in -short mode")
	}
	testenv.RequireIsolatedRoot(t)
	if msg := os.Getenv(baseErrEnv); msg != "" {
		t.Fatalf("building the base image: %s", msg)
	}
	img, err := baseimage.Load(os.Getenv(baseDirEnv))
	if err != nil {
		t.Fatalf("base image: %v (TestMain must call testassets.Prepare)", err)
	}
	return img
}
