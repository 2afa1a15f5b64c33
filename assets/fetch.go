package assets

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// FetchManifest lists files to download, each pinned by its sha256, for
// example a Firecracker binary and the kernel it was tested with:
//
//	{"files": [{"name": "firecracker", "url": "https://…", "sha256": "…", "size": 3097088, "executable": true}]}
type FetchManifest struct {
	Files []FetchFile `json:"files"`
}

// FetchFile is one pinned download.
type FetchFile struct {
	Name       string `json:"name"` // the asset is named fetched/<name>
	URL        string `json:"url"`
	SHA256     string `json:"sha256"`
	Size       int64  `json:"size,omitempty"` // when given, the exact size, checked while downloading
	Executable bool   `json:"executable,omitempty"`
}

// MaxFetchSize bounds a download whose size the manifest does not give.
const MaxFetchSize = 8 << 30

var fetchName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ReadFetchManifest reads and checks a fetch manifest.
func ReadFetchManifest(path string) (FetchManifest, error) {
	var fm FetchManifest
	b, err := os.ReadFile(path)
	if err != nil {
		return fm, fmt.Errorf("fetch manifest: %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fm); err != nil {
		return fm, fmt.Errorf("fetch manifest %s: %w", path, err)
	}
	var errs []error
	seen := map[string]bool{}
	for i, f := range fm.Files {
		if !fetchName.MatchString(f.Name) || seen[f.Name] {
			errs = append(errs, fmt.Errorf("files[%d].name: %q is not a unique simple file name", i, f.Name))
		}
		seen[f.Name] = true
		if u, err := url.Parse(f.URL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			errs = append(errs, fmt.Errorf("files[%d].url: want an http(s) URL, got %q", i, f.URL))
		}
		if b, err := hex.DecodeString(f.SHA256); err != nil || len(b) != sha256.Size || strings.ToLower(f.SHA256) != f.SHA256 {
			errs = append(errs, fmt.Errorf("files[%d].sha256: want %d lower-case hex digits", i, sha256HexLen))
		}
		if f.Size < 0 || f.Size > MaxFetchSize {
			errs = append(errs, fmt.Errorf("files[%d].size: out of range", i))
		}
	}
	return fm, errors.Join(errs...)
}

// Fetch downloads the files of fm into the cache directory dir, skipping
// those already there with the right sha256. Each download streams to a
// .part file while it is hashed and is renamed into place only once its
// size and sha256 match.
func Fetch(ctx context.Context, dir string, fm FetchManifest, client *http.Client, progress io.Writer) (Manifest, error) {
	if client == nil {
		client = &http.Client{Timeout: 30 * time.Minute}
	}
	unlock, err := lock(ctx, dir)
	if err != nil {
		return Manifest{}, err
	}
	defer unlock()
	m, err := Load(dir)
	if err != nil {
		return m, err
	}
	p := newProgress(progress)
	for _, f := range fm.Files {
		name := Name(fetchedPrefix + f.Name)
		file := filepath.Join("fetched", f.Name)
		if a, ok := m.fresh(name, f.SHA256); ok && a.SHA256 == f.SHA256 {
			p.printf("fetch", "%s is up to date", f.Name)
			continue
		}
		start := time.Now()
		p.printf("fetch", "%s from %s", f.Name, f.URL)
		if err := download(ctx, client, f, filepath.Join(dir, file)); err != nil {
			return m, fmt.Errorf("fetch %s: %w", f.Name, err)
		}
		a, err := m.record(name, file, f.SHA256, "")
		if err != nil {
			return m, err
		}
		p.printf("fetch", "%s: %s in %s, sha256 verified", f.Name, humanSize(a.Size), time.Since(start).Round(100*time.Millisecond))
	}
	return m, nil
}

func download(ctx context.Context, client *http.Client, f FetchFile, dest string) error {
	if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.URL, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", f.URL, resp.Status)
	}
	limit := int64(MaxFetchSize)
	if f.Size > 0 {
		limit = f.Size
		if resp.ContentLength >= 0 && resp.ContentLength != f.Size {
			return fmt.Errorf("the server announces %d bytes, the manifest says %d", resp.ContentLength, f.Size)
		}
	}
	part := dest + ".part"
	out, err := os.OpenFile(part, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer os.Remove(part)
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), io.LimitReader(resp.Body, limit+1))
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	switch {
	case n > limit:
		return fmt.Errorf("more than %d bytes", limit)
	case f.Size > 0 && n != f.Size:
		return fmt.Errorf("got %d bytes, want %d", n, f.Size)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != f.SHA256 {
		return fmt.Errorf("sha256 %s, want %s", sum, f.SHA256)
	}
	mode := os.FileMode(0o644)
	if f.Executable {
		mode = 0o755
	}
	if err := os.Chmod(part, mode); err != nil {
		return err
	}
	return os.Rename(part, dest)
}
