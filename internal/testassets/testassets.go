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

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/baseimage"
	"github.com/alephvm/alephvm/internal/testenv"
)

const (
	baseDirEnv   = "ALEPHVM_TEST_BASE_IMAGE_DIR"
	baseErrEnv   = "ALEPHVM_TEST_BASE_IMAGE_ERROR"
	assetsDirEnv = "ALEPHVM_TEST_NODE_ASSETS_DIR"
	assetsErrEnv = "ALEPHVM_TEST_NODE_ASSETS_ERROR"
)

// Prepare builds the base image into the test cache when the tests will
// boot VMs: as root, outside the isolated namespace, not in -short mode.
// Call it from TestMain after flag.Parse; with programs, it also builds
// what program VMs boot (PrepareProgramAssets).
func Prepare(programs bool) {
	if os.Geteuid() != 0 || testenv.Isolated() || testing.Short() || os.Getenv(baseDirEnv) != "" {
		return
	}
	if programs {
		prepareProgramAssets()
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

// prepareProgramAssets builds alephvm-init and the kernel, initramfs and
// runtime of program VMs with the project's own asset builder.
func prepareProgramAssets() {
	fail := func(err error) { os.Setenv(assetsErrEnv, err.Error()) }
	dir := filepath.Join(testenv.CachePath(), "assets")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fail(err)
		return
	}
	initBin := filepath.Join(dir, "alephvm-init")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", initBin, "github.com/alephvm/alephvm/cmd/alephvm-init")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fail(fmt.Errorf("build alephvm-init: %v\n%s", err, out))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	var out bytes.Buffer
	if _, err := assets.Build(ctx, assets.Options{Dir: dir, Init: initBin, Runtime: true, Progress: &out}); err != nil {
		fail(fmt.Errorf("%v\n%s", err, out.String()))
		return
	}
	os.Setenv(assetsDirEnv, dir)
}

// ProgramAssets returns the directory of the assets Prepare built for
// program VMs (the node's ASSETS_DIR), failing or skipping the test as
// BaseImage does.
func ProgramAssets(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs: not in -short mode")
	}
	testenv.RequireIsolatedRoot(t)
	if msg := os.Getenv(assetsErrEnv); msg != "" {
		t.Fatalf("building the program assets: %s", msg)
	}
	dir := os.Getenv(assetsDirEnv)
	if dir == "" {
		t.Fatal("no program assets (TestMain must call testassets.Prepare(true))")
	}
	return dir
}
