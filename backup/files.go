package backup

import (
	"archive/tar"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/alephvm/alephvm/storage"
)

// The files of one backup in the backups directory, named as the
// reference names them: <id>.tar, <id>.tar.sha256 and <id>.tar.meta.json.
// The tar is renamed into place last: a backup whose tar is there is
// whole.
const (
	tarSuffix    = ".tar"
	sumSuffix    = ".tar.sha256"
	metaSuffix   = ".tar.meta.json"
	idTimeLayout = "20060102T150405Z"
	// workPrefix starts the directory a backup is made in, removed when
	// it ends and, after a crash, when the node starts.
	workPrefix = ".work-"
)

// SignatureTTL is how long a download URL is valid, as the reference's.
const SignatureTTL = 24 * time.Hour

// Consistency says how a backup's disks were copied.
type Consistency string

const (
	// Frozen: the guest agent froze the guest's filesystems during the
	// copy (their data and journals written out first): each filesystem
	// is clean, as after an unmount.
	Frozen Consistency = "frozen"
	// Crash: the VM was paused (its disk I/O flushed) during the copy,
	// without the guest's help: the disk is as after a power cut, which
	// journaling filesystems recover from.
	Crash Consistency = "crash"
)

// storedMeta is <id>.tar.meta.json: the reference's fields (vm_hash,
// created_at, source_sizes) and how the disks were copied.
type storedMeta struct {
	VMHash      string      `json:"vm_hash"`
	CreatedAt   string      `json:"created_at"`
	SourceSizes sizes       `json:"source_sizes,omitempty"`
	Consistency Consistency `json:"consistency,omitempty"`
}

// Meta is what the backup routes answer of a backup, in the reference's
// shape and key order (backup_metadata, then download_url), with its
// consistency added.
type Meta struct {
	BackupID    string      `json:"backup_id"`
	Size        int64       `json:"size"`
	Volumes     []string    `json:"volumes"`
	ExpiresAt   string      `json:"expires_at"`
	Checksum    string      `json:"checksum,omitempty"`
	SourceSizes sizes       `json:"source_sizes,omitempty"`
	Consistency Consistency `json:"consistency,omitempty"`
	DownloadURL string      `json:"download_url"`
}

// sizes maps a tar member to the size of the disk file it was copied
// from, in the order of the tar, as the reference's dict keeps it.
type sizes []namedSize

type namedSize struct {
	Name string
	Size int64
}

func (s sizes) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, n := range s {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(n.Name)
		b.Write(k)
		b.WriteByte(':')
		b.WriteString(strconv.FormatInt(n.Size, 10))
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (s *sizes) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return fmt.Errorf("source_sizes: not an object")
	}
	*s = nil
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		var n int64
		if err := dec.Decode(&n); err != nil {
			return fmt.Errorf("source_sizes: %w", err)
		}
		*s = append(*s, namedSize{Name: t.(string), Size: n})
	}
	return nil
}

func (s sizes) total() int64 {
	var n int64
	for _, x := range s {
		n += x.Size
	}
	return n
}

// Error is a refusal with the HTTP status and the plain-text body the
// reference answers.
type Error struct {
	Status int
	Msg    string
	Err    error
}

func (e *Error) Error() string {
	if e.Err != nil && e.Msg == "" {
		return e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// HTTPStatus implements api.StatusError.
func (e *Error) HTTPStatus() int { return e.Status }

func refuse(status int, format string, args ...any) *Error {
	return &Error{Status: status, Msg: fmt.Sprintf(format, args...)}
}

// ValidateID checks a backup id taken from a URL, as the reference does
// (400 "Invalid backup_id" for an empty one or one with a path separator
// or "..", 403 for another VM's), and more strictly: it must start with
// the VM's hash and a dash, and hold no control character.
func ValidateID(id, vmHash string) error {
	if id == "" || strings.ContainsAny(id, "/\\") || strings.Contains(id, "..") ||
		strings.ContainsFunc(id, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return refuse(400, "Invalid backup_id")
	}
	if !strings.HasPrefix(id, vmHash+"-") {
		return refuse(403, "Backup does not belong to this VM")
	}
	return nil
}

// Sign is the reference's presigned URL signature: the hex HMAC-SHA256,
// keyed by secret, of "<backup_id>:<vm_hash>:<expires>".
func Sign(secret, id, vmHash string, expires int64) string {
	mac := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(mac, "%s:%s:%d", id, vmHash, expires)
	return hex.EncodeToString(mac.Sum(nil))
}

// Verify checks the signature and expires query parameters of a download
// URL at now, answering as the reference.
func Verify(secret, id, vmHash, signature, expires string, now time.Time) error {
	if signature == "" || expires == "" {
		return refuse(403, "Missing signature or expires parameter")
	}
	exp, err := strconv.ParseInt(strings.TrimSpace(expires), 10, 64)
	if err != nil {
		return refuse(400, "Invalid expires parameter")
	}
	if now.Unix() > exp {
		return refuse(403, "Download link has expired")
	}
	if !hmac.Equal([]byte(signature), []byte(Sign(secret, id, vmHash, exp))) {
		return refuse(403, "Invalid signature")
	}
	return nil
}

// DownloadURL is the presigned URL of backup id, valid until expires.
func DownloadURL(domain, secret, id, vmHash string, expires time.Time) string {
	exp := expires.Unix()
	return fmt.Sprintf("https://%s/control/machine/%s/backup/%s?signature=%s&expires=%d",
		domain, vmHash, id, Sign(secret, id, vmHash, exp), exp)
}

// LoadSecret returns the key that signs download URLs, kept in path
// (made at the first call, 0600): unlike the reference's, which is made
// anew at each start, a URL stays valid across a restart of the node.
func LoadSecret(path string) (string, error) {
	if b, err := os.ReadFile(path); err == nil {
		if s := strings.TrimSpace(string(b)); len(s) >= 32 {
			return s, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("backup URL key: %w", err)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	s := hex.EncodeToString(raw)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", err
	}
	if err := storage.WriteFileDurable(path, []byte(s+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("backup URL key: %w", err)
	}
	return s, nil
}

// newID names a backup of vmHash made at t, as the reference does:
// <hash>-<UTC time to the second>.
func newID(vmHash string, t time.Time) string {
	return vmHash + "-" + t.UTC().Format(idTimeLayout)
}

// pyISO writes t as Python's datetime.isoformat with a UTC zone:
// microseconds only when there are some.
func pyISO(t time.Time) string {
	t = t.UTC().Round(time.Microsecond)
	if t.Nanosecond() == 0 {
		return t.Format("2006-01-02T15:04:05+00:00")
	}
	return t.Format("2006-01-02T15:04:05.000000+00:00")
}

// list returns the backups of vmHash in dir, newest first.
func list(dir, vmHash string) ([]string, error) {
	matches, err := filepath.Glob(filepath.Join(dir, vmHash+"-*"+tarSuffix))
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(matches))
	for _, m := range matches {
		ids = append(ids, strings.TrimSuffix(filepath.Base(m), tarSuffix))
	}
	sort.Sort(sort.Reverse(sort.StringSlice(ids)))
	return ids, nil
}

// remove deletes backup id and its sidecars.
func remove(dir, id string) error {
	err := os.Remove(filepath.Join(dir, id+tarSuffix))
	for _, s := range []string{sumSuffix, metaSuffix} {
		if rerr := os.Remove(filepath.Join(dir, id+s)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
			err = rerr
		}
	}
	return err
}

// readMeta builds the answer of backup id from its files, as the
// reference's backup_metadata; expires_at is its tar's time plus maxAge.
func readMeta(dir, id string, maxAge time.Duration) (Meta, error) {
	path := filepath.Join(dir, id+tarSuffix)
	f, err := os.Open(path)
	if err != nil {
		return Meta{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Meta{}, err
	}
	m := Meta{BackupID: id, Size: st.Size(), Volumes: []string{}, ExpiresAt: pyISO(st.ModTime().Add(maxAge))}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return Meta{}, fmt.Errorf("read backup %s: %w", id, err)
		}
		m.Volumes = append(m.Volumes, h.Name)
	}
	if sum, err := readChecksum(dir, id); err == nil && sum != "" {
		m.Checksum = "sha256:" + sum
	}
	if b, err := os.ReadFile(filepath.Join(dir, id+metaSuffix)); err == nil {
		var sm storedMeta
		if json.Unmarshal(b, &sm) == nil {
			m.SourceSizes, m.Consistency = sm.SourceSizes, sm.Consistency
		}
	}
	return m, nil
}

// readChecksum reads the hex sha256 of backup id from its sidecar.
func readChecksum(dir, id string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, id+sumSuffix))
	if err != nil {
		return "", err
	}
	fields := strings.Fields(string(b))
	if len(fields) == 0 {
		return "", nil
	}
	return fields[0], nil
}

// sourceSize is the sum of backup id's source_sizes, its X-Source-Size.
func sourceSize(dir, id string) int64 {
	b, err := os.ReadFile(filepath.Join(dir, id+metaSuffix))
	if err != nil {
		return 0
	}
	var sm storedMeta
	if json.Unmarshal(b, &sm) != nil {
		return 0
	}
	return sm.SourceSizes.total()
}
