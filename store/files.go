package store

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/message"
)

// LocalSender is the sender and owner of the STORE messages AddFile
// creates. They are unsigned and marked local in the index.
const LocalSender = "alephvm-local"

// Item is a verified local file, pinned: it is not evicted until Release.
// Path must be treated as read-only (it is mode 0444): copy it for a
// writable disk.
type Item struct {
	Ref      message.ItemHash // the STORE message the file was resolved from: the amend, when use_latest picked one
	FileHash message.ItemHash // content.item_hash of that message: a sha256, or a CID for IPFS items
	Path     string
	SHA256   string
	Size     int64
	// Verified is false for an IPFS item a gateway sent as the raw file
	// rather than as blocks to check against its CID (docs/store.md).
	Verified bool

	pin  *os.File // holds the shared lock
	once sync.Once
}

// Release unpins the file. It may be called more than once.
func (it *Item) Release() {
	it.once.Do(func() { it.pin.Close() })
}

// Added describes a file added to the store.
type Added struct {
	Ref    message.ItemHash // the local STORE message naming the file: the ref to put in a message
	SHA256 string
	Size   int64
}

// errGone: the file is not (or no longer) in the store.
var errGone = errors.New("not in the store")

// record is a row of store_files.
type record struct {
	sha256   string
	size     int64
	verified bool
}

// Resolve returns the STORE message that ref names (with useLatest, its
// latest amend) without downloading its file: what a plan needs to know
// before the node admits what the file is for.
func (s *Store) Resolve(ctx context.Context, ref message.ItemHash, useLatest bool) (*message.Message, error) {
	msg, err := s.resolve(ctx, ref, useLatest)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", ref, err)
	}
	return msg, nil
}

func (s *Store) resolve(ctx context.Context, ref message.ItemHash, useLatest bool) (*message.Message, error) {
	msg, _, err := s.Message(ctx, ref)
	if err != nil {
		return nil, err
	}
	if msg.Type != message.TypeStore {
		return nil, fmt.Errorf("it is a %s message: %w", msg.Type, ErrNotStore)
	}
	if useLatest {
		return s.latest(ctx, msg)
	}
	return msg, nil
}

// Fetch returns the file named by the STORE message ref (with useLatest,
// by its latest amend), downloading and verifying it first if needed. The
// caller must Release the item.
func (s *Store) Fetch(ctx context.Context, ref message.ItemHash, useLatest bool) (*Item, error) {
	msg, err := s.resolve(ctx, ref, useLatest)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", ref, err)
	}
	c := msg.Content.(*message.StoreContent)
	item, err := s.file(ctx, c)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", ref, err)
	}
	item.Ref = msg.ItemHash
	return item, nil
}

// file pins the file c names, downloading it when it is missing.
func (s *Store) file(ctx context.Context, c *message.StoreContent) (*Item, error) {
	for tries := 0; ; tries++ {
		item, err := s.pin(ctx, c.ItemHash)
		if err == nil || !errors.Is(err, errGone) {
			return item, err
		}
		if tries == 2 {
			return nil, fmt.Errorf("file %s was evicted as soon as it was downloaded, twice: %w", c.ItemHash, err)
		}
		if s.remote == nil {
			return nil, fmt.Errorf("file %s: %w (and no API server or IPFS gateway is configured)", c.ItemHash, ErrNotFound)
		}
		err = s.flights.do(ctx, string(c.ItemHash), func(ctx context.Context) error {
			s.opts.Events.DownloadStarted()
			err := s.download(ctx, c)
			s.opts.Events.DownloadEnded(err)
			return err
		})
		if err != nil {
			return nil, err
		}
	}
}

// pin opens the file indexed under hash and takes its shared lock.
func (s *Store) pin(ctx context.Context, hash message.ItemHash) (*Item, error) {
	var rec record
	err := s.db.QueryRowContext(ctx, `SELECT sha256, size, verified FROM store_files WHERE item_hash = ?`, hash).
		Scan(&rec.sha256, &rec.size, &rec.verified)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, errGone
	} else if err != nil {
		return nil, fmt.Errorf("look up file %s: %w", hash, err)
	}
	path := s.blobPath(rec.sha256)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		s.log.Warn("indexed file missing, forgetting it", "item", hash, "path", path)
		return nil, errors.Join(errGone, s.forget(ctx, rec.sha256))
	} else if err != nil {
		return nil, fmt.Errorf("open file %s: %w", hash, err)
	}
	if err := lockShared(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("pin file %s: %w", hash, err)
	}
	if !stillAt(f) { // evicted while we waited for the lock
		f.Close()
		return nil, errGone
	}
	if st, err := f.Stat(); err != nil || st.Size() != rec.size {
		// Only a crash or a hand on the disk truncates a file that was
		// synced before it was renamed in; it cannot be used.
		f.Close()
		s.log.Error("stored file has the wrong size, dropping it", "item", hash, "path", path, "want", rec.size)
		return nil, errors.Join(errGone, os.Remove(path), s.forget(ctx, rec.sha256))
	}
	if _, err := s.db.ExecContext(ctx, `UPDATE store_files SET last_used = ? WHERE item_hash = ?`, time.Now().UnixNano(), hash); err != nil {
		f.Close()
		return nil, fmt.Errorf("record use of file %s: %w", hash, err)
	}
	return &Item{FileHash: hash, Path: path, SHA256: rec.sha256, Size: rec.size, Verified: rec.verified, pin: f}, nil
}

// forget drops the index rows of a blob.
func (s *Store) forget(ctx context.Context, sha string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM store_files WHERE sha256 = ?`, sha); err != nil {
		return fmt.Errorf("forget file %s: %w", sha, err)
	}
	return nil
}

// download fetches the file c names into tmp/<item hash>.part, resuming
// what a previous run left there, verifies it and moves it into place.
// Another process downloading the same item holds the .part lock: this
// waits for it.
func (s *Store) download(ctx context.Context, c *message.StoreContent) error {
	u, err := s.remote.fileURL(c)
	if err != nil {
		return err
	}
	limit, declared, err := s.sizeLimit(c)
	if err != nil {
		return err
	}
	if c.ItemType == message.ItemIPFS {
		if _, err := ipfsRoot(string(c.ItemHash)); err != nil {
			return err
		}
	}
	partPath := filepath.Join(s.tmp, string(c.ItemHash)+".part")
	var part *os.File
	for {
		if part, err = os.OpenFile(partPath, os.O_RDWR|os.O_CREATE, 0o644); err != nil {
			return fmt.Errorf("download %s: %w", c.ItemHash, err)
		}
		if err := lockExclusive(ctx, part); err != nil {
			part.Close()
			return fmt.Errorf("download %s: %w", c.ItemHash, err)
		}
		if stillAt(part) {
			break
		}
		part.Close() // finished or discarded by the holder
	}
	defer part.Close()
	if item, err := s.pin(ctx, c.ItemHash); err == nil { // another process finished it
		item.Release()
		return os.Remove(partPath)
	}
	var need int64
	if st, err := part.Stat(); err == nil && declared {
		need = max(0, limit-st.Size())
	}
	space, err := s.reserve(c.ItemHash, need)
	if err != nil {
		return errors.Join(err, os.Remove(partPath))
	}
	defer space.release()

	p := &partFile{f: part, h: sha256.New(), item: c.ItemHash, limit: limit, declared: declared, space: space, progress: s.opts.Progress}
	for fresh := false; ; fresh = true {
		if c.ItemType == message.ItemIPFS {
			if err := p.restart(); err != nil { // a CAR stream cannot be resumed
				return err
			}
		} else if err := p.resume(); err != nil {
			return fmt.Errorf("download %s: read what was downloaded before: %w", c.ItemHash, err)
		}
		resumed := p.off > 0
		if resumed {
			s.log.Info("resuming download", "item", c.ItemHash, "from", p.off)
		}
		started := time.Now()
		err = s.retry(ctx, "download "+string(c.ItemHash), s.opts.Attempts, func(ctx context.Context) error {
			return s.get(ctx, u, c, p)
		})
		if err != nil && (c.ItemType == message.ItemIPFS || errors.Is(err, ErrHashMismatch) || errors.Is(err, ErrNotFound) ||
			errors.Is(err, ErrTooLarge) || errors.Is(err, ErrInsufficientStorage)) {
			return errors.Join(err, os.Remove(partPath)) // nothing worth resuming
		} else if err != nil {
			return err // the .part stays, to resume
		}
		sum := hex.EncodeToString(p.h.Sum(nil))
		err = checkDownload(c, sum, p.off)
		if err == nil {
			s.log.Info("downloaded", "item", c.ItemHash, "size", p.off, "took", time.Since(started).Round(time.Millisecond), "verified", p.verified)
			if !p.verified {
				s.log.Warn("the gateway sent the raw file, not a CAR: IPFS item not verified against its CID", "item", c.ItemHash, "sha256", sum)
			}
			if err := s.commit(ctx, part, sum, p.off, c.ItemHash, p.verified, false); err != nil {
				return err
			}
			s.evictAfterDownload(ctx, sum)
			return nil
		}
		if err := p.restart(); err != nil {
			return errors.Join(err, os.Remove(partPath))
		}
		if !resumed || fresh {
			return errors.Join(fmt.Errorf("download %s from %s: %w", c.ItemHash, u, err), os.Remove(partPath))
		}
		s.log.Warn("resumed download does not verify, starting again", "item", c.ItemHash, "err", err)
	}
}

// declaredSize is the size a STORE message gives its file, if it gives a
// usable one.
func declaredSize(c *message.StoreContent) (int64, bool) {
	if c.Size == nil || *c.Size < 0 {
		return 0, false
	}
	return *c.Size, true
}

// sizeLimit is the most a download of c may write: the size its message
// gives, else MaxItemSize. A message giving more than MaxItemSize is
// refused.
func (s *Store) sizeLimit(c *message.StoreContent) (limit int64, declared bool, err error) {
	size, ok := declaredSize(c)
	if !ok {
		return s.opts.MaxItemSize, false, nil
	}
	if size > s.opts.MaxItemSize {
		return 0, false, fmt.Errorf("file %s: %w: its message says %d bytes, more than the %d a file may take (STORE_MAX_ITEM_SIZE)",
			c.ItemHash, ErrTooLarge, size, s.opts.MaxItemSize)
	}
	return size, true, nil
}

// checkDownload verifies a downloaded file against its STORE message. An
// IPFS item's blocks were checked as they arrived, if they could be.
func checkDownload(c *message.StoreContent, sum string, size int64) error {
	if want, ok := declaredSize(c); ok && want != size {
		return &HashMismatchError{Item: c.ItemHash, Got: fmt.Sprintf("%s (%d bytes, the message says %d)", sum, size, want)}
	}
	if c.ItemType != message.ItemIPFS && sum != string(c.ItemHash) {
		return &HashMismatchError{Item: c.ItemHash, Got: sum}
	}
	return nil
}

// partFile is a download under way: the .part file, the sha256 of what it
// holds and how much that is.
type partFile struct {
	f        *os.File
	h        hash.Hash
	off      int64
	limit    int64 // the most the file may hold
	declared bool  // limit is the size the STORE message gives, not MaxItemSize
	total    int64 // for progress: the expected size, or -1
	verified bool  // what was written came out of the CAR verifier, or is a storage item
	space    *reservation
	item     message.ItemHash
	progress func(Progress)
}

// Write appends to the file, refusing to go past the limit or below the
// free-space floor: nothing is written then.
func (p *partFile) Write(b []byte) (int, error) {
	if p.off+int64(len(b)) > p.limit {
		return 0, p.tooLarge(p.off + int64(len(b)))
	}
	if err := p.space.write(int64(len(b))); err != nil {
		return 0, err
	}
	n, err := p.f.Write(b)
	p.h.Write(b[:n])
	p.off += int64(n)
	if p.progress != nil {
		p.progress(Progress{Item: p.item, Done: p.off, Total: p.total})
	}
	if err != nil {
		return n, fmt.Errorf("write %s: %w", p.f.Name(), err)
	}
	return n, nil
}

// tooLarge is the error for a file found to hold at least size bytes, more
// than its limit.
func (p *partFile) tooLarge(size int64) error {
	if p.declared {
		return &HashMismatchError{Item: p.item, Got: fmt.Sprintf("at least %d bytes, more than the %d bytes the message says", size, p.limit)}
	}
	return fmt.Errorf("file %s: %w: at least %d bytes, more than the %d a file may take (STORE_MAX_ITEM_SIZE)", p.item, ErrTooLarge, size, p.limit)
}

// resume continues after what the file already holds, unless that is more
// than it may.
func (p *partFile) resume() error {
	p.h.Reset()
	off, err := p.f.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	if off > p.limit {
		return p.restart()
	}
	p.off = off
	_, err = io.Copy(p.h, io.NewSectionReader(p.f, 0, off))
	return err
}

// restart empties the file.
func (p *partFile) restart() error {
	p.h.Reset()
	p.off = 0
	if err := p.f.Truncate(0); err != nil {
		return err
	}
	_, err := p.f.Seek(0, io.SeekStart)
	return err
}

var errStalled = errors.New("stalled")

// get makes one request for the file, from where p stands for a storage
// item, and appends what arrives to p: the bytes themselves, or for an IPFS
// item served as a CAR stream the file reassembled from verified blocks.
func (s *Store) get(ctx context.Context, u string, c *message.StoreContent, p *partFile) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stall := time.AfterFunc(s.opts.StallTimeout, func() { cancel(errStalled) })
	defer stall.Stop()

	ipfs := c.ItemType == message.ItemIPFS
	if ipfs {
		if err := p.restart(); err != nil {
			return permanent(err)
		}
		u += "?format=car"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return permanent(err)
	}
	if ipfs {
		req.Header.Set("Accept", carAccept)
	} else if p.off > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", p.off))
	}
	resp, err := s.opts.Client.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrRemoteUnavailable, describeCause(ctx, err, s.opts.StallTimeout))
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusRequestedRangeNotSatisfiable {
		if p.declared && p.off == p.limit {
			return nil // it was all there
		}
		return errors.Join(errors.New("the server refused to resume"), p.restart())
	}
	if err := statusError(resp, u); err != nil {
		return err
	}
	if p.off > 0 && (resp.StatusCode == http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Range"), "bytes "+strconv.FormatInt(p.off, 10)+"-")) {
		// The server sent the whole file, or another range: start over.
		if err := p.restart(); err != nil {
			return permanent(err)
		}
	}
	contentType := resp.Header.Get("Content-Type")
	asCAR := ipfs && isCAR(contentType)
	rawLength := resp.ContentLength // of the file itself, unless a CAR
	if asCAR {
		rawLength = -1
	}
	if rawLength >= 0 && p.off+rawLength > p.limit {
		return permanent(p.tooLarge(p.off + rawLength))
	}
	p.total = -1
	if p.declared {
		p.total = p.limit
	} else if rawLength >= 0 {
		p.total = p.off + rawLength
	}
	body := &stallReader{r: resp.Body, timer: stall, timeout: s.opts.StallTimeout, received: s.opts.Events.DownloadReceived}
	if p.verified = !ipfs; asCAR {
		root, rerr := ipfsRoot(string(c.ItemHash))
		if rerr != nil {
			return permanent(rerr)
		}
		_, err = writeVerifiedCAR(body, root, carSendsDups(contentType), p, dagLimitsFor(p.limit, p.tooLarge))
		p.verified = true
	} else {
		_, err = io.CopyBuffer(p, body, make([]byte, 1<<20))
	}
	switch {
	case err == nil:
		return nil
	case body.err != nil || errors.Is(err, io.ErrUnexpectedEOF):
		cause := err
		if body.err != nil {
			cause = describeCause(ctx, body.err, s.opts.StallTimeout)
		}
		return fmt.Errorf("%w: %s: %w", ErrRemoteUnavailable, u, cause)
	case errors.Is(err, ErrHashMismatch), errors.Is(err, ErrTooLarge), errors.Is(err, ErrInsufficientStorage):
		return permanent(err)
	default:
		return permanent(fmt.Errorf("%s: %w", u, err))
	}
}

// stallReader notes each read that brings data, so that a transfer is
// dropped only when it stalls, however long it takes in all.
type stallReader struct {
	r       io.Reader
	timer   *time.Timer
	timeout time.Duration
	err     error // the last read error other than io.EOF
	// received counts the bytes read.
	received func(n int)
}

func (r *stallReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	if n > 0 {
		r.timer.Reset(r.timeout)
		r.received(n)
	}
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

func describeCause(ctx context.Context, err error, stall time.Duration) error {
	if errors.Is(context.Cause(ctx), errStalled) {
		return fmt.Errorf("no data for %s", stall)
	}
	return err
}

// commit syncs a verified file, moves it to files/<sha256> and indexes it
// under item. The caller holds f's exclusive lock, so that no eviction or
// GC in another process can take the blob before it is indexed.
func (s *Store) commit(ctx context.Context, f *os.File, sum string, size int64, item message.ItemHash, verified, local bool) error {
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", f.Name(), err)
	}
	if err := f.Chmod(0o444); err != nil {
		return fmt.Errorf("store %s: %w", item, err)
	}
	blob := s.blobPath(sum)
	if _, err := os.Stat(blob); err == nil {
		// The same bytes are already there, under another item or from
		// before a crash; they were verified when they were put there.
		if err := os.Remove(f.Name()); err != nil {
			return fmt.Errorf("store %s: %w", item, err)
		}
	} else {
		if err := os.Rename(f.Name(), blob); err != nil {
			return fmt.Errorf("store %s: %w", item, err)
		}
		if err := syncDir(s.files); err != nil {
			return fmt.Errorf("store %s: %w", item, err)
		}
	}
	now := time.Now().UnixNano()
	_, err := s.db.ExecContext(ctx, `INSERT INTO store_files (item_hash, sha256, size, verified, local, last_used, added_at)
		VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (item_hash) DO UPDATE SET local = max(local, excluded.local), last_used = excluded.last_used`,
		item, sum, size, verified, local, now, now)
	if err != nil {
		return fmt.Errorf("index file %s: %w", item, err)
	}
	return nil
}

// AddFile copies a local file into the store, hashing it on the way, and
// returns the local STORE message that names it (the same one each time
// the same bytes are added). The file is never evicted.
func (s *Store) AddFile(ctx context.Context, path string) (Added, error) {
	src, err := os.Open(path)
	if err != nil {
		return Added{}, fmt.Errorf("add file: %w", err)
	}
	defer src.Close()
	if st, err := src.Stat(); err != nil || !st.Mode().IsRegular() {
		return Added{}, fmt.Errorf("add file %s: not a regular file", path)
	}
	tmp, err := os.CreateTemp(s.tmp, "add-*.part")
	if err != nil {
		return Added{}, fmt.Errorf("add file %s: %w", path, err)
	}
	defer tmp.Close()
	committed := false
	defer func() {
		if !committed {
			os.Remove(tmp.Name())
		}
	}()
	if err := lockExclusive(ctx, tmp); err != nil {
		return Added{}, fmt.Errorf("add file %s: %w", path, err)
	}
	started := time.Now()
	sum, size, err := copyAndHash(ctx, tmp, src)
	if err != nil {
		return Added{}, fmt.Errorf("add file %s: %w", path, err)
	}
	if err := s.commit(ctx, tmp, sum, size, message.ItemHash(sum), true, true); err != nil {
		return Added{}, fmt.Errorf("add file %s: %w", path, err)
	}
	committed = true
	ref, err := s.localStoreMessage(ctx, sum, size, filepath.Base(path))
	if err != nil {
		return Added{}, fmt.Errorf("add file %s: %w", path, err)
	}
	s.log.Info("file added", "path", path, "ref", ref, "sha256", sum, "size", size, "took", time.Since(started).Round(time.Millisecond))
	return Added{Ref: ref, SHA256: sum, Size: size}, nil
}

// copyAndHash copies src to dst in the kernel (copy_file_range, or a
// reflink where the filesystem has them) while another goroutine hashes
// what has landed in dst: the hash is of the bytes the store keeps, and on
// two cores the copy and the hash overlap.
func copyAndHash(ctx context.Context, dst, src *os.File) (string, int64, error) {
	const chunk = 8 << 20
	copied := make(chan int64, 16)
	copyErr := make(chan error, 1)
	go func() {
		defer close(copied)
		var off int64
		for ctx.Err() == nil {
			n, err := io.CopyN(dst, src, chunk)
			if n > 0 {
				// Start writing the chunk to disk now, so that the sync
				// before the rename has little left to wait for.
				_ = unix.SyncFileRange(int(dst.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
				off += n
				copied <- off
			}
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				copyErr <- err
				return
			}
		}
		copyErr <- ctx.Err()
	}()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	var hashed int64
	var hashErr error
	for off := range copied {
		if hashErr == nil {
			_, hashErr = io.CopyBuffer(h, io.NewSectionReader(dst, hashed, off-hashed), buf)
			hashed = off
		}
	}
	if err := errors.Join(<-copyErr, hashErr); err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), hashed, nil
}

// localStoreMessage returns the local STORE message naming the file sum,
// creating it when there is none.
func (s *Store) localStoreMessage(ctx context.Context, sum string, size int64, name string) (message.ItemHash, error) {
	var existing message.ItemHash
	err := s.db.QueryRowContext(ctx, `SELECT item_hash FROM store_messages
		WHERE local AND type = 'STORE' AND sender = ? AND file_hash = ? AND ref IS NULL LIMIT 1`, LocalSender, sum).Scan(&existing)
	if err == nil {
		return existing, nil
	} else if !errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("look up the STORE message of %s: %w", sum, err)
	}
	now := float64(time.Now().UnixMicro()) / 1e6
	itemContent, err := json.Marshal(struct {
		Address  string           `json:"address"`
		Time     float64          `json:"time"`
		ItemType message.ItemType `json:"item_type"`
		ItemHash string           `json:"item_hash"`
		Size     int64            `json:"size"`
		Metadata map[string]any   `json:"metadata"`
	}{LocalSender, now, message.ItemStorage, sum, size, map[string]any{"name": name}})
	if err != nil {
		return "", err
	}
	raw, err := json.Marshal(map[string]any{
		"chain":        "ETH",
		"sender":       LocalSender,
		"type":         message.TypeStore,
		"signature":    nil,
		"time":         now,
		"item_type":    message.ItemInline,
		"item_content": string(itemContent),
		"item_hash":    message.SHA256Hex(itemContent),
		"content":      json.RawMessage(itemContent),
	})
	if err != nil {
		return "", err
	}
	msg, err := message.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("build the STORE message of %s: %w", sum, err)
	}
	return msg.ItemHash, s.saveMessage(ctx, msg, raw, true)
}
