package api

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alephvm/alephvm/backup"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/pool"
)

// fakeBackups answers the backup routes from canned answers and records
// what the restores read.
type fakeBackups struct {
	mu       sync.Mutex
	requests []backup.Request
	file     string
	restored []string
}

var testMeta = backup.Meta{BackupID: string(other) + "-20261203T104258Z", Size: 3072, Volumes: []string{"rootfs.qcow2"},
	ExpiresAt: "2026-12-04T10:42:58.250000+00:00", Checksum: "sha256:90bc", Consistency: backup.Frozen,
	DownloadURL: "https://node.example/control/machine/" + string(other) + "/backup/x?signature=ab&expires=1"}

func (f *fakeBackups) Create(_ context.Context, ref message.ItemHash, req backup.Request) (backup.Answer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.requests = append(f.requests, req)
	if ref != other {
		return backup.Answer{}, backup.NotHosted(ref)
	}
	return backup.Answer{Status: 202}, nil
}

func (f *fakeBackups) Status(ref message.ItemHash) backup.Answer {
	meta := testMeta
	return backup.Answer{Status: 200, Meta: &meta}
}

func (f *fakeBackups) Open(ref message.ItemHash, id, signature, expires string) (*backup.Download, error) {
	if err := backup.ValidateID(id, string(ref)); err != nil {
		return nil, err
	}
	if signature != "good" {
		return nil, &backup.Error{Status: 403, Msg: "Invalid signature"}
	}
	file, err := os.Open(f.file)
	if err != nil {
		return nil, err
	}
	return &backup.Download{File: file, Name: id + ".tar", Checksum: "90bc", SourceSize: 196624, ModTime: time.Unix(1764845000, 0)}, nil
}

func (f *fakeBackups) Delete(ref message.ItemHash, id string) error {
	return backup.ValidateID(id, string(ref))
}

func (f *fakeBackups) Restore(_ context.Context, ref message.ItemHash, src backup.Restore) error {
	what := "volume_ref " + src.VolumeRef
	if src.Upload != nil {
		b, err := io.ReadAll(src.Upload)
		if err != nil {
			return err
		}
		what = "upload " + string(b)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.restored = append(f.restored, what)
	if src.VolumeRef == "0bad" {
		return &backup.Error{Status: 400, Msg: "Uploaded file is not a valid QCOW2 disk image"}
	}
	return nil
}

func backupCall(t *testing.T, method, u, token, contentType string, body io.Reader, h ...string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, u, body)
	if token != "" {
		req.Header.Set("X-Auth-Signature", token)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(h); i += 2 {
		req.Header.Set(h[i], h[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// TestBackupRoutes checks the routes' statuses, bodies and headers as the
// reference writes them.
func TestBackupRoutes(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f := &fakeBackups{file: filepath.Join(t.TempDir(), "b.tar")}
	os.WriteFile(f.file, []byte("0123456789"), 0o600)
	srv := httptest.NewServer(New(Options{Programs: pool.New(pool.Options{Log: log}), Instances: &fakeInstances{}, Auth: tokenAuth{},
		Backups: f, Version: "test", Log: log}))
	defer srv.Close()
	base := srv.URL + "/control/machine/" + string(other)

	resp, body := backupCall(t, "POST", base+"/backup?include_volumes=true&skip_fsfreeze=true", "good", "", nil)
	if resp.StatusCode != 202 || body != `{"status": "in_progress"}` || resp.Header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("POST backup: %d %q %v", resp.StatusCode, body, resp.Header)
	}
	if r := f.requests[0]; !r.IncludeVolumes || !r.SkipFreeze {
		t.Errorf("query not passed: %+v", r)
	}
	if resp, body := backupCall(t, "POST", base+"/backup", "", "", nil); resp.StatusCode != 401 {
		t.Errorf("without credentials: %d %s", resp.StatusCode, body)
	}
	unknown := srv.URL + "/control/machine/" + strings.Repeat("ab", 32)
	if resp, body := backupCall(t, "POST", unknown+"/backup", "good", "", nil); resp.StatusCode != 404 || body != "No virtual machine with ref "+strings.Repeat("ab", 32) {
		t.Errorf("unknown VM: %d %q", resp.StatusCode, body)
	}

	resp, body = backupCall(t, "GET", base+"/backup", "good", "", nil)
	want := `{"backup_id": "` + testMeta.BackupID + `", "size": 3072, "volumes": ["rootfs.qcow2"], "expires_at": "2026-12-04T10:42:58.250000+00:00", ` +
		`"checksum": "sha256:90bc", "consistency": "frozen", "download_url": "` + testMeta.DownloadURL + `"}`
	if resp.StatusCode != 200 || body != want {
		t.Fatalf("GET backup: %d\n%s\nwant\n%s", resp.StatusCode, body, want)
	}

	// The download takes no credentials but its signature.
	id := testMeta.BackupID
	resp, body = backupCall(t, "GET", base+"/backup/"+id+"?signature=good&expires=1", "", "", nil)
	h := resp.Header
	if resp.StatusCode != 200 || body != "0123456789" || h.Get("Content-Type") != "application/x-tar" ||
		h.Get("Content-Disposition") != `attachment; filename="`+id+`.tar"` || h.Get("X-Backup-Checksum") != "sha256:90bc" ||
		h.Get("X-Source-Size") != "196624" || h.Get("Content-Length") != "10" {
		t.Fatalf("download: %d %q %v", resp.StatusCode, body, h)
	}
	if resp, body := backupCall(t, "GET", base+"/backup/"+id+"?signature=good&expires=1", "", "", nil, "Range", "bytes=4-"); resp.StatusCode != 206 || body != "456789" {
		t.Errorf("resumed download: %d %q", resp.StatusCode, body)
	}
	if resp, body := backupCall(t, "GET", base+"/backup/"+id+"?signature=bad&expires=1", "", "", nil); resp.StatusCode != 403 || body != "Invalid signature" {
		t.Errorf("bad signature: %d %q", resp.StatusCode, body)
	}
	if resp, body := backupCall(t, "GET", base+"/backup/"+strings.Repeat("ab", 32)+"-1?signature=good&expires=1", "", "", nil); resp.StatusCode != 403 || body != "Backup does not belong to this VM" {
		t.Errorf("another VM's backup: %d %q", resp.StatusCode, body)
	}
	if resp, body := backupCall(t, "DELETE", base+"/backup/"+id, "good", "", nil); resp.StatusCode != 200 || body != "Deleted backup "+id {
		t.Errorf("delete: %d %q", resp.StatusCode, body)
	}
	if resp, _ := backupCall(t, "DELETE", base+"/backup/"+id, "", "", nil); resp.StatusCode != 401 {
		t.Errorf("delete without credentials: %d", resp.StatusCode)
	}

	// A restore from an upload, streamed to the manager.
	var mp bytes.Buffer
	w := multipart.NewWriter(&mp)
	w.WriteField("note", "ignored")
	part, _ := w.CreateFormFile("rootfs", "rootfs.qcow2")
	part.Write([]byte("QFI\xfbdisk"))
	w.Close()
	resp, body = backupCall(t, "POST", base+"/restore", "good", w.FormDataContentType(), bytes.NewReader(mp.Bytes()))
	if resp.StatusCode != 200 || body != `{"status": "restored", "vm_hash": "`+string(other)+`"}` || f.restored[0] != "upload QFI\xfbdisk" {
		t.Fatalf("restore: %d %q %q", resp.StatusCode, body, f.restored)
	}
	if resp, _ := backupCall(t, "POST", base+"/restore", "bad", w.FormDataContentType(), bytes.NewReader(mp.Bytes())); resp.StatusCode != 401 {
		t.Errorf("an upload with a bad token: %d", resp.StatusCode)
	}
	var none bytes.Buffer
	w = multipart.NewWriter(&none)
	w.WriteField("other", "x")
	w.Close()
	if resp, body := backupCall(t, "POST", base+"/restore", "good", w.FormDataContentType(), &none); resp.StatusCode != 400 || body != "Missing 'rootfs' field in multipart upload" {
		t.Errorf("no rootfs field: %d %q", resp.StatusCode, body)
	}
	for _, c := range []struct {
		body, want string
		status     int
	}{
		{`{"volume_ref": "0abc"}`, `{"status": "restored", "vm_hash": "` + string(other) + `"}`, 200},
		{`{"volume_ref": "0bad"}`, "Uploaded file is not a valid QCOW2 disk image", 400},
		{`not json`, "Expected multipart upload or JSON with volume_ref", 400},
		{`{"volume_ref": 12}`, "Invalid volume_ref format", 400},
	} {
		if resp, body := backupCall(t, "POST", base+"/restore", "good", "application/json", strings.NewReader(c.body)); resp.StatusCode != c.status || body != c.want {
			t.Errorf("restore %s: %d %q", c.body, resp.StatusCode, body)
		}
	}
}
