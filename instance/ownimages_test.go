package instance

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/internal/testenv"
)

// The images docs/building-images.md builds, and their default users.
const (
	buildingImagesDoc = "../docs/building-images.md"
	ownImagesDirEnv   = "ALEPHVM_TEST_OWN_IMAGES_DIR"
	ownImagesErrEnv   = "ALEPHVM_TEST_OWN_IMAGES_ERROR"
)

// docScript is the doc's sh blocks, in order: the commands a user runs.
func docScript(doc []byte) string {
	var b strings.Builder
	in := false
	sc := bufio.NewScanner(bytes.NewReader(doc))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case !in && line == "```sh":
			in = true
		case in && strings.HasPrefix(line, "```"):
			in = false
		case in:
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// prepareOwnImages runs the commands of docs/building-images.md, from
// TestMain where Debian's mirror is reachable (the tests run in a
// namespace with no uplink), when TestOwnImages is to run. The images are
// kept in the test cache under the hash of the doc.
func prepareOwnImages() {
	if os.Geteuid() != 0 || testenv.Isolated() || testing.Short() {
		return
	}
	if f := flag.Lookup("test.run"); f != nil && f.Value.String() != "" {
		if ok, _ := regexp.MatchString(strings.Split(f.Value.String(), "/")[0], "TestOwnImages"); !ok {
			return
		}
	}
	fail := func(err error) { os.Setenv(ownImagesErrEnv, err.Error()) }
	doc, err := os.ReadFile(buildingImagesDoc)
	if err != nil {
		fail(err)
		return
	}
	for _, tool := range []string{"mmdebstrap", "grub-mkimage", "sfdisk", "mkfs.ext4", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			fail(fmt.Errorf("needs %s, which is not installed (see scripts/test.sh)", tool))
			return
		}
	}
	sum := sha256.Sum256(doc)
	dir := filepath.Join(testenv.CachePath(), "own-images", hex.EncodeToString(sum[:8]))
	done := filepath.Join(dir, "done")
	if _, err := os.Stat(done); err == nil {
		os.Setenv(ownImagesDirEnv, dir)
		return
	}
	os.RemoveAll(dir)
	work := filepath.Join(dir, "work")
	if err := os.MkdirAll(work, 0o755); err != nil {
		fail(err)
		return
	}
	// mmdebstrap as the doc runs it, with the test cache's .deb files.
	shim := filepath.Join(dir, "bin")
	real, _ := exec.LookPath("mmdebstrap")
	cache, err := assets.PackageCacheArgs(testenv.PackageCache())
	if err != nil {
		fail(err)
		return
	}
	line := "exec " + shellQuote(real)
	for _, a := range cache {
		line += " " + shellQuote(a)
	}
	os.MkdirAll(shim, 0o755)
	if err := os.WriteFile(filepath.Join(shim, "mmdebstrap"), []byte("#!/bin/sh\n"+line+` "$@"`+"\n"), 0o755); err != nil {
		fail(err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", docScript(doc))
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "PATH="+shim+":"+os.Getenv("PATH"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	started := time.Now()
	if err := cmd.Run(); err != nil {
		tail := out.String()
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		fail(fmt.Errorf("the commands of docs/building-images.md: %v\n%s", err, tail))
		return
	}
	for _, name := range []string{"debian-bios.qcow2", "aleph-gpt.raw"} {
		if err := os.Rename(filepath.Join(work, name), filepath.Join(dir, name)); err != nil {
			fail(err)
			return
		}
	}
	os.RemoveAll(work)
	os.WriteFile(done, []byte(time.Since(started).Round(time.Second).String()+"\n"), 0o644)
	os.Setenv(ownImagesDirEnv, dir)
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// TestOwnImages boots the two images docs/building-images.md builds, made
// otherwise than the base image: GRUB for the BIOS in an MBR, ifupdown and
// the default user debian, shipped as a compressed qcow2; GRUB in the BIOS
// boot partition of a raw GPT disk, systemd-networkd and the default user
// aleph. Each reaches SSH as its default user with the message's key, with
// its address and default route from the seed, by the renderer it has,
// and its root filesystem grown to the disk.
func TestOwnImages(t *testing.T) {
	if testing.Short() {
		t.Skip("builds two Debian images and boots them under emulation: minutes")
	}
	r := newRig(t)
	if msg := os.Getenv(ownImagesErrEnv); msg != "" {
		t.Fatalf("building the images of docs/building-images.md: %s", msg)
	}
	dir := os.Getenv(ownImagesDirEnv)
	if dir == "" {
		t.Fatal("the images of docs/building-images.md were not built (TestMain must call prepareOwnImages)")
	}
	key, pub := testenv.SSHKey(t)
	m := r.manager()
	// Erased at the end: no need to wait for a clean shutdown under TCG.
	m.opts.StopTimeouts = hypervisor.StopTimeouts{Shutdown: 2 * time.Second, Quit: 10 * time.Second, Kill: 5 * time.Second}
	images := []struct {
		name, file, user, network string
	}{
		{"bios-mbr-ifupdown-compressed-qcow2", "debian-bios.qcow2", "debian", "/etc/network/interfaces.d/50-cloud-init"},
		{"gpt-bios-boot-networkd-raw", "aleph-gpt.raw", "aleph", "/etc/systemd/network/10-cloud-init-eth0.network"},
	}
	for _, img := range images {
		t.Run(img.name, func(t *testing.T) {
			ctx := context.Background()
			ref := r.messageFor(filepath.Join(dir, img.file), hypervisor.QEMU, 3072, pub)
			start := time.Now()
			if err := m.Start(ctx, ref); err != nil {
				t.Fatal(err)
			}
			defer m.Erase(ctx, ref)
			rec, _ := r.records.Get(ctx, ref)
			host := img.user + "@" + rec.IPv4
			testenv.WaitSSH(t, key, host, 8*time.Minute)
			t.Logf("%s: allocation to SSH as %s: %s", img.name, img.user, time.Since(start).Round(time.Second))
			out, err := testenv.SSH(key, host, "id -un; ip -4 route show default; test -s "+img.network+" && echo rendered; df -B1 --output=size / | tail -1")
			if err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			lines := strings.Split(out, "\n")
			if len(lines) != 4 || lines[0] != img.user || !strings.HasPrefix(lines[1], "default via ") || lines[2] != "rendered" {
				t.Fatalf("want the user %s, a default route and %s written by cloud-init; got:\n%s", img.user, img.network, out)
			}
			if fs, _ := strconv.ParseInt(lines[3], 10, 64); fs < 2600<<20 {
				t.Errorf("root filesystem of %d bytes: not grown to the 3 GiB disk", fs)
			}
			if err := m.Erase(ctx, ref); err != nil {
				t.Fatal(err)
			}
		})
	}
}
