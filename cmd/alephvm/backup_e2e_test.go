package main

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

// TestBackupRestoreEndToEnd backs up an instance while its guest writes,
// downloads the backup through its presigned URL, checks it (sha256,
// qemu-img check, e2fsck of its root filesystem, the file synced before
// the backup), then restores it over a changed disk and finds that file
// again once the VM has booted from the restored disk. One VM.
func TestBackupRestoreEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a Debian VM under emulation: minutes")
	}
	testenv.RequireIsolatedRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img", "nft", "mkfs.ext4", "ip", "e2fsck", "debugfs")
	base := testassets.BaseImage(t)
	key, pub := testenv.SSHKey(t)
	keyFile := filepath.Join(t.TempDir(), "key.pub")
	os.WriteFile(keyFile, []byte(pub+"\n"), 0o600)

	dir, port, env := nodeEnv(t, "lo", "10.0.0.53")
	os.MkdirAll(filepath.Join(dir, "cache"), 0o755)
	if err := os.Symlink(filepath.Dir(base.Disk), filepath.Join(dir, "cache", "base-image")); err != nil {
		t.Fatal(err)
	}
	node := startNode(t, env, port)
	code, out, errOut := runCLI(t, env, "instance", "create", "--image", base.Ext4, "--size", "2048", "--ssh-key", keyFile)
	if code != 0 {
		t.Fatalf("create: %s %s", out, errOut)
	}
	ref := strings.TrimSpace(out)
	// Runs before the node's own cleanup: instances outlive the node.
	t.Cleanup(func() {
		if code, out, errOut := runCLI(t, env, "vm", "erase", ref); code != 0 {
			t.Errorf("erase: %s %s", out, errOut)
		}
	})
	if code, out, errOut := runCLI(t, env, "vm", "start", ref); code != 0 {
		t.Fatalf("start: %s %s\n%s", out, errOut, node.logs.String())
	}
	ip := listVMs(t, port)[ref].Networking.IPv4
	booted := testenv.WaitSSH(t, key, ip, 6*time.Minute)
	t.Logf("first boot: SSH after %s", booted.Round(time.Second))

	token := make([]byte, 16)
	rand.Read(token)
	mark := hex.EncodeToString(token)
	ssh := func(cmd string) string {
		t.Helper()
		out, err := testenv.SSH(key, ip, cmd)
		if err != nil {
			t.Fatalf("ssh %q: %v %s", cmd, err, out)
		}
		return out
	}
	ssh("echo " + mark + " > /root/synced && sync")
	agent, _ := testenv.SSH(key, ip, "systemctl is-active qemu-guest-agent")
	// The guest keeps writing while the backup is taken.
	ssh(`nohup sh -c 'while :; do dd if=/dev/urandom of=/root/churn bs=64k count=32 conv=fsync status=none; done' >/dev/null 2>&1 & echo $! > /root/churn.pid`)

	api := fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s", port, ref)
	start := time.Now()
	if status, body := operatorPost(t, api+"/backup"); status != 202 || body != `{"status": "in_progress"}` {
		t.Fatalf("backup: %d %s\n%s", status, body, node.logs.String())
	}
	var meta struct {
		BackupID    string           `json:"backup_id"`
		Size        int64            `json:"size"`
		Volumes     []string         `json:"volumes"`
		Checksum    string           `json:"checksum"`
		SourceSizes map[string]int64 `json:"source_sizes"`
		Consistency string           `json:"consistency"`
		DownloadURL string           `json:"download_url"`
	}
	for deadline := time.Now().Add(15 * time.Minute); ; time.Sleep(2 * time.Second) {
		status, body := operatorGet(t, api+"/backup")
		if status == 200 {
			if err := json.Unmarshal([]byte(body), &meta); err != nil {
				t.Fatal(err)
			}
			break
		}
		if status != 202 || time.Now().After(deadline) {
			t.Fatalf("backup status: %d %s\n%s", status, body, node.logs.String())
		}
	}
	t.Logf("backup %s: %d bytes, %s, in %s", meta.BackupID, meta.Size, meta.Consistency, time.Since(start).Round(time.Second))
	if strings.TrimSpace(agent) == "active" && meta.Consistency != "frozen" {
		t.Errorf("the guest runs its agent but the backup is %q\n%s", meta.Consistency, node.logs.String())
	}
	if len(meta.Volumes) != 1 || meta.Volumes[0] != "rootfs.qcow2" || meta.SourceSizes["rootfs.qcow2"] == 0 {
		t.Errorf("meta: %+v", meta)
	}
	ssh("kill $(cat /root/churn.pid)")
	runningLayer(t, env, dir, ref, base.Ext4, mark, strings.TrimSpace(agent) == "active")

	// The download, with the presigned URL's query alone.
	u, err := url.Parse(meta.DownloadURL)
	if err != nil || !strings.HasPrefix(meta.DownloadURL, "https://") {
		t.Fatalf("download URL %q: %v", meta.DownloadURL, err)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s?%s", port, u.Path, u.RawQuery))
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	tarPath := filepath.Join(work, "backup.tar")
	f, _ := os.Create(tarPath)
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), resp.Body)
	resp.Body.Close()
	f.Close()
	sum := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if err != nil || resp.StatusCode != 200 || n != meta.Size || sum != meta.Checksum || resp.Header.Get("X-Backup-Checksum") != sum {
		t.Fatalf("download: %d, %d bytes (%v), %s; meta %s, header %s", resp.StatusCode, n, err, sum, meta.Checksum, resp.Header.Get("X-Backup-Checksum"))
	}
	root := filepath.Join(work, "rootfs.qcow2")
	extractMember(t, tarPath, "rootfs.qcow2", root)
	if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", root).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	raw := filepath.Join(work, "root.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", root, raw).CombinedOutput(); err != nil {
		t.Fatalf("convert: %v\n%s", err, out)
	}
	fs := ext4Filesystem(t, raw)
	fsck, err := exec.Command("e2fsck", "-n", "-f", fs).CombinedOutput()
	if err != nil {
		t.Errorf("e2fsck -n of the backup's root filesystem: %v\n%s", err, fsck)
	}
	if got, err := exec.Command("debugfs", "-R", "cat /root/synced", fs).Output(); err != nil || strings.TrimSpace(string(got)) != mark {
		t.Fatalf("the synced file in the backup: %q %v", got, err)
	}

	// The disk changes, then the backup is restored over it.
	ssh("echo changed > /root/synced && sync")
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	part, _ := mw.CreateFormFile("rootfs", "rootfs.qcow2")
	rf, _ := os.Open(root)
	io.Copy(part, rf)
	rf.Close()
	mw.Close()
	req, _ := http.NewRequest("POST", api+"/restore", &body)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("X-Auth-Signature", "test")
	start = time.Now()
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(answer) != `{"status": "restored", "vm_hash": "`+ref+`"}` {
		t.Fatalf("restore: %d %s\n%s", resp.StatusCode, answer, node.logs.String())
	}
	t.Logf("restore answered in %s", time.Since(start).Round(time.Second))
	ip = listVMs(t, port)[ref].Networking.IPv4
	booted = testenv.WaitSSH(t, key, ip, 6*time.Minute)
	if got := ssh("cat /root/synced"); got != mark {
		t.Fatalf("after the restore, /root/synced holds %q, want %q", got, mark)
	}
	t.Logf("restored VM: SSH after %s", booted.Round(time.Second))
	disks := filepath.Join(dir, "state", "volumes", ref)
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(2 * time.Second) {
		prev, _ := filepath.Glob(filepath.Join(disks, "rootfs.pre-restore-*"))
		if len(prev) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("the previous disk is still kept after the restored VM booted: %v\n%s", prev, node.logs.String())
			break
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "backups", "restore-"+ref+".qcow2")); !os.IsNotExist(err) {
		t.Errorf("the upload is left after the restore: %v", err)
	}
	if status, body := operatorRequest(t, "DELETE", api+"/backup/"+meta.BackupID); status != 200 {
		t.Errorf("delete: %d %s", status, body)
	}
}

// extractMember copies member name of the tar at path to dst.
func extractMember(t *testing.T, path, name, dst string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("%s not in the backup: %v", name, err)
		}
		if h.Name != name {
			continue
		}
		out, _ := os.Create(dst)
		defer out.Close()
		if _, err := io.Copy(out, tr); err != nil {
			t.Fatal(err)
		}
		return
	}
}

// ext4Filesystem returns the ext4 filesystem of the raw disk at raw: the
// disk itself when it is a bare filesystem, else its first ext4
// partition, through a read-only loop device with its partitions.
func ext4Filesystem(t *testing.T, raw string) string {
	t.Helper()
	isExt4 := func(path string) bool {
		f, err := os.Open(path)
		if err != nil {
			return false
		}
		defer f.Close()
		magic := make([]byte, 2)
		_, err = f.ReadAt(magic, 1024+0x38)
		return err == nil && binary.LittleEndian.Uint16(magic) == 0xef53
	}
	if isExt4(raw) {
		return raw
	}
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", "--partscan", raw).Output()
	if err != nil {
		t.Fatalf("losetup: %v", err)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	time.Sleep(time.Second)
	parts, _ := filepath.Glob(loop + "p*")
	for _, p := range parts {
		if isExt4(p) {
			return p
		}
	}
	t.Fatalf("no ext4 filesystem on the backup's disk (partitions %v)", parts)
	return ""
}

// runningLayer makes a layer of running instance ref (alephvm image layer,
// through the node) and reads the synced file back through it over the
// base image.
func runningLayer(t *testing.T, env []string, dir, ref, baseFile, mark string, agent bool) {
	t.Helper()
	start := time.Now()
	code, out, errOut := runCLI(t, env, "image", "layer", ref)
	if code != 0 {
		t.Fatalf("image layer of the running instance: %s %s", out, errOut)
	}
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 {
			got[f[0]] = f[1]
		}
	}
	t.Logf("layer of the running instance in %s: %v", time.Since(start).Round(time.Second), got)
	baseRef, err := os.ReadFile(filepath.Join(dir, "state", "volumes", ref, "base.ref"))
	if err != nil {
		t.Fatal(err)
	}
	if got["parent"] != "aleph://"+strings.TrimSpace(string(baseRef)) || got["ref"] == "" {
		t.Fatalf("layer: %q, want parent aleph://%s", out, baseRef)
	}
	if agent && got["consistency"] != "frozen" {
		t.Errorf("the guest runs its agent but the layer is %q", got["consistency"])
	}
	work := t.TempDir()
	layer := filepath.Join(work, "layer.qcow2")
	if code, out, errOut := runCLI(t, env, "store", "get", got["ref"], "-o", layer); code != 0 {
		t.Fatalf("store get: %s %s", out, errOut)
	}
	if st, _ := os.Stat(layer); st == nil || st.Size() > 512<<20 {
		t.Errorf("the layer is %v: not only the instance's writes", st)
	}
	chain := fmt.Sprintf(`json:{"driver":"qcow2","file":{"driver":"file","filename":%q},"backing":{"driver":"raw","file":{"driver":"file","filename":%q}}}`, layer, baseFile)
	raw := filepath.Join(work, "root.raw")
	if out, err := exec.Command("qemu-img", "convert", "-O", "raw", chain, raw).CombinedOutput(); err != nil {
		t.Fatalf("read the layer over its base: %v\n%s", err, out)
	}
	if got, err := exec.Command("debugfs", "-R", "cat /root/synced", raw).Output(); err != nil || strings.TrimSpace(string(got)) != mark {
		t.Fatalf("the synced file through the layer: %q %v", got, err)
	}
}
