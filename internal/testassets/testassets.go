// Package testassets builds, once per test cache, the images VM tests
// boot. Building them needs the network (apt), which tests in their own
// network namespace do not have: TestMain calls Prepare before
// testenv.RunIsolated, and the tests read the outcome with BaseImage.
package testassets

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
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
	if _, err := baseimage.Build(ctx, dir, baseimage.Options{Progress: &out, PackageCache: testenv.PackageCache()}); err != nil {
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
// runtime of program VMs with the project's own asset builder, in the
// shared cache, then gives this test binary its own view of them: a
// directory of hard links and a manifest naming exactly the initramfs of
// the init it built. Two checkouts (two versions of the init) running VM
// tests at once would otherwise rebuild the shared manifest under each
// other, and a node could boot the other checkout's init.
func prepareProgramAssets() {
	fail := func(err error) { os.Setenv(assetsErrEnv, err.Error()) }
	dir := filepath.Join(testenv.CachePath(), "assets")
	runs := filepath.Join(testenv.CachePath(), "assets-run")
	removeDeadRuns(runs)
	own := filepath.Join(runs, strconv.Itoa(os.Getpid()))
	if err := os.MkdirAll(own, 0o755); err != nil {
		fail(err)
		return
	}
	initBin := filepath.Join(own, "alephvm-init")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", initBin, "github.com/alephvm/alephvm/cmd/alephvm-init")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fail(fmt.Errorf("build alephvm-init: %v\n%s", err, out))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	var out bytes.Buffer
	m, err := assets.Build(ctx, assets.Options{Dir: dir, Init: initBin, Runtime: true, PackageCache: testenv.PackageCache(), Progress: &out})
	if err != nil {
		fail(fmt.Errorf("%v\n%s", err, out.String()))
		return
	}
	// A replaced asset's file stays in the shared cache an hour, so the
	// files of m are there to link.
	if err := linkAssets(m, own); err != nil {
		fail(fmt.Errorf("private view of the test assets: %w", err))
		return
	}
	os.Setenv(assetsDirEnv, own)
}

// linkAssets makes dir a cache directory holding m's assets: hard links
// to its files and its manifest.
func linkAssets(m assets.Manifest, dir string) error {
	for _, a := range m.Assets {
		dst := filepath.Join(dir, a.File)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		os.Remove(dst)
		if err := os.Link(filepath.Join(m.Dir, a.File), dst); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "manifest.json"), b, 0o644)
}

// removeDeadRuns removes the asset views of test binaries that have ended.
func removeDeadRuns(runs string) {
	entries, _ := os.ReadDir(runs)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || syscall.Kill(pid, 0) == nil {
			continue
		}
		os.RemoveAll(filepath.Join(runs, e.Name()))
	}
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
