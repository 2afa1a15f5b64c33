package storage

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/alephvm/alephvm/internal/testenv"
)

func sparseFile(t *testing.T, path string) []byte {
	t.Helper()
	data := make([]byte, 1<<20)
	rand.Read(data)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// 1 MiB of data, a 62 MiB hole, 1 MiB of data.
	f.WriteAt(data, 0)
	f.WriteAt(data, 63<<20)
	return data
}

func allocated(t *testing.T, path string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func checkClone(t *testing.T, src, dst string, want CloneMethod) {
	t.Helper()
	data := sparseFile(t, src)
	method, err := CloneFile(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if method != want {
		t.Errorf("method %s, want %s", method, want)
	}
	got, _ := os.ReadFile(dst)
	if len(got) != 64<<20 || !bytes.Equal(got[:1<<20], data) || !bytes.Equal(got[63<<20:], data) || bytes.ContainsFunc(got[1<<20:63<<20], func(r rune) bool { return r != 0 }) {
		t.Error("content differs")
	}
	if a := allocated(t, dst); a > 8<<20 {
		t.Errorf("clone allocates %d bytes: holes were filled", a)
	}
	if _, err := CloneFile(src, dst); err == nil {
		t.Error("overwrote an existing file")
	}
}

func TestCloneFallsBackToSparseCopy(t *testing.T) {
	dir := t.TempDir()
	if ok, _ := SupportsReflink(dir); ok {
		t.Skip("the temporary directory supports reflinks; the fallback cannot be seen here")
	}
	checkClone(t, filepath.Join(dir, "src"), filepath.Join(dir, "dst"), FullCopy)
}

// mountXFS loop-mounts a fresh 512 MiB xfs with reflinks for the test
// and returns its mount point.
func mountXFS(t testing.TB) string {
	t.Helper()
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "mkfs.xfs", "losetup")
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img, 512<<20)
	testenv.Cmd(t, "mkfs.xfs", "-q", "-m", "reflink=1", img)
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot loop-mount xfs here: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	if ok, err := SupportsReflink(mnt); !ok || err != nil {
		t.Fatalf("xfs with reflink=1 does not reflink: %v", err)
	}
	return mnt
}

// TestReflinkOnXFS clones on a loop-mounted xfs image and checks that the
// copy shares the source's extents.
func TestReflinkOnXFS(t *testing.T) {
	mnt := mountXFS(t)
	testenv.RequireTools(t, "filefrag")
	src, dst := filepath.Join(mnt, "src"), filepath.Join(mnt, "dst")
	checkClone(t, src, dst, Reflink)
	if out := testenv.Cmd(t, "filefrag", "-v", dst); !strings.Contains(out, "shared") {
		t.Errorf("clone's extents are not shared:\n%s", out)
	}
}

// The reflink probe clones for real: on tmpfs, which has no reflinks, it
// says no and leaves nothing behind; a directory it cannot write in is an
// error, not a no.
func TestSupportsReflinkNegative(t *testing.T) {
	if st, err := os.Stat("/dev/shm"); err != nil || !st.IsDir() {
		t.Skip("no /dev/shm tmpfs here")
	}
	dir, err := os.MkdirTemp("/dev/shm", "alephvm-reflink-")
	if err != nil {
		t.Skip(err)
	}
	defer os.RemoveAll(dir)
	if ok, err := SupportsReflink(dir); ok || err != nil {
		t.Errorf("tmpfs: %v %v", ok, err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("the probe left %d files", len(left))
	}
	if _, err := SupportsReflink(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing directory probed without error")
	}
}
