// Package store is the node's content store: the messages and files every
// VM is assembled from, named by hash and verified before use.
//
// A program's code and runtime, a volume or an instance's parent image is
// named by a ref: the item hash of a STORE message whose content.item_hash
// names the file (a sha256 for storage items, a CID for IPFS items). The
// store resolves refs locally first, then from an Aleph core node's HTTP
// API and an IPFS gateway when they are configured, follows use_latest
// amends, and downloads each file once, however many callers want it.
//
// The API other packages use:
//
//	s, err := store.Open(ctx, store.Options{Root: cacheRoot, DB: db, ...})
//	added, err := s.AddFile(ctx, path)          // a local file; added.Ref is its STORE message
//	msg, err := s.AddMessage(ctx, raw)          // validate and keep a message
//	msg, raw, err := s.Message(ctx, hash)       // local, then remote
//	item, err := s.Fetch(ctx, ref, useLatest)   // a verified local file for a STORE ref
//	defer item.Release()                        // until then item.Path is never evicted
//	res, err := s.GC(ctx, maxSize)
//	go s.Sweep(ctx, store.SweepInterval)     // GC while the node runs
//
// Errors can be tested with errors.Is against ErrNotFound, ErrNotStore,
// ErrHashMismatch, ErrInvalidMessage, ErrRemoteUnavailable, ErrTooLarge
// and ErrInsufficientStorage.
//
// Storage files are checked against their sha256; IPFS files block by
// block against their CID, from the gateway's CAR stream (recorded
// unverified when a gateway only sends the raw file).
//
// On disk, under Root: files/<sha256> holds each file (read-only), tmp/
// the downloads and additions under way (<item hash>.part, kept to resume
// after a restart, for a while). The messages and the index of files live in the node's
// database (tables store_messages and store_files). docs/store.md has the
// rules.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alephvm/alephvm/message"
)

// Errors callers can test with errors.Is.
var (
	// ErrNotFound: no message or file has that hash, locally or remotely.
	ErrNotFound = errors.New("not found")
	// ErrNotStore: a ref names a message that is not a STORE message.
	ErrNotStore = errors.New("not a STORE message")
	// ErrHashMismatch: the bytes received do not have the hash they were asked for.
	ErrHashMismatch = errors.New("hash mismatch")
	// ErrInvalidMessage: a message fails validation.
	ErrInvalidMessage = errors.New("invalid message")
	// ErrRemoteUnavailable: the API server or gateway could not be reached
	// or kept failing.
	ErrRemoteUnavailable = errors.New("remote unavailable")
	// ErrTooLarge: a file is (or says it is) larger than Options.MaxItemSize.
	ErrTooLarge = errors.New("item too large")
	// ErrInsufficientStorage: a download would take the cache filesystem
	// below Options.MinFreeSpace.
	ErrInsufficientStorage = errors.New("insufficient storage")
)

// Defaults of the Options that bound what downloads may take.
const (
	DefaultMaxItemSize   = 20 << 30
	DefaultPartMaxAge    = 24 * time.Hour
	DefaultMessageMaxAge = 7 * 24 * time.Hour
)

// HashMismatchError says which item arrived with the wrong hash.
type HashMismatchError struct {
	Item message.ItemHash
	Got  string // what the bytes hash to
}

func (e *HashMismatchError) Error() string {
	return fmt.Sprintf("%s: the bytes received hash to %s", e.Item, e.Got)
}

// Is makes errors.Is(err, ErrHashMismatch) true.
func (e *HashMismatchError) Is(target error) bool { return target == ErrHashMismatch }

// Progress reports how far a download is.
type Progress struct {
	Item  message.ItemHash // the file being downloaded
	Done  int64            // bytes on disk so far, resumed ones included
	Total int64            // expected size, or -1 when unknown
}

// Options configure a Store. Root and DB are required.
type Options struct {
	Root        string  // the store's directory (the node's CACHE_ROOT)
	DB          *sql.DB // the node's database, migrated by package db
	APIServer   string  // an Aleph core node's API, e.g. https://api.aleph.im; "" for none
	IPFSGateway string  // e.g. https://ipfs.aleph.im/ipfs; "" for none
	// MaxSize bounds the size of the downloaded files kept; past it the least
	// recently used ones not in use are evicted after each download. 0 means
	// no limit. Files added locally are never evicted.
	MaxSize int64
	// StallTimeout drops and retries a download that receives nothing for
	// that long (default 2 minutes).
	StallTimeout time.Duration
	// Attempts bounds the tries of one download (default 10; a message
	// request gets at most 3), Backoff is the first wait between two
	// (default 500 ms; it doubles up to 30 s).
	Attempts int
	Backoff  time.Duration
	// Client makes the HTTP requests (default: one with a 30 s connect
	// timeout and no transparent compression, which would break resuming).
	Client *http.Client
	Log    *slog.Logger
	// Progress, if set, is called as downloads advance, from the
	// downloading goroutine.
	Progress func(Progress)
	// MaxItemSize bounds a downloaded file whose STORE message gives no
	// size (or a negative one); a message that gives more is refused
	// before any download (default DefaultMaxItemSize).
	MaxItemSize int64
	// MinFreeSpace is the free space a download must leave on the cache
	// filesystem: one that would go below it is refused, or stopped and
	// its .part removed. 0: no floor.
	MinFreeSpace int64
	// FreeSpace reports the bytes free for the store under dir (default:
	// statfs(2), the blocks available to unprivileged users).
	FreeSpace func(dir string) (int64, error)
	// PartMaxAge is how long GC keeps a download's .part no one writes to,
	// so that it can resume (default DefaultPartMaxAge).
	PartMaxAge time.Duration
	// MessageMaxAge is how long GC keeps a message fetched from the network
	// that nothing needs (default DefaultMessageMaxAge): see GC.
	MessageMaxAge time.Duration
	// Events, if set, is told of downloads and evictions, for the node's
	// metrics.
	Events Events
}

// Events is told of the store's downloads and evictions. Its methods are
// called on the downloads' path: they must be quick.
type Events interface {
	// DownloadStarted and DownloadEnded frame one download (err: why it
	// failed, nil when it did not).
	DownloadStarted()
	DownloadEnded(err error)
	// DownloadReceived counts n bytes received by a download.
	DownloadReceived(n int)
	// Evicted counts a file of size bytes evicted.
	Evicted(size int64)
}

type noEvents struct{}

func (noEvents) DownloadStarted()     {}
func (noEvents) DownloadEnded(error)  {}
func (noEvents) DownloadReceived(int) {}
func (noEvents) Evicted(int64)        {}

// Store is the content store. Its methods are safe for concurrent use, and
// several processes may share one Root and database.
type Store struct {
	opts    Options
	db      *sql.DB
	log     *slog.Logger
	remote  *remote // nil when neither an API server nor a gateway is set
	flights flights
	files   string // Root/files
	tmp     string // Root/tmp

	// reserveMu makes checking the free space and reserving it one step;
	// reserved is what downloads under way still expect to write.
	reserveMu sync.Mutex
	reserved  atomic.Int64
}

// Open prepares the store's directories and returns it.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if opts.Root == "" || opts.DB == nil {
		return nil, errors.New("open store: a root directory and a database are required")
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.StallTimeout <= 0 {
		opts.StallTimeout = 2 * time.Minute
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 10
	}
	if opts.Backoff <= 0 {
		opts.Backoff = 500 * time.Millisecond
	}
	if opts.MaxItemSize <= 0 {
		opts.MaxItemSize = DefaultMaxItemSize
	}
	if opts.FreeSpace == nil {
		opts.FreeSpace = statfsFree
	}
	if opts.PartMaxAge <= 0 {
		opts.PartMaxAge = DefaultPartMaxAge
	}
	if opts.MessageMaxAge <= 0 {
		opts.MessageMaxAge = DefaultMessageMaxAge
	}
	if opts.Events == nil {
		opts.Events = noEvents{}
	}
	if opts.Client == nil {
		opts.Client = &http.Client{Transport: &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: 30 * time.Second}).DialContext,
			TLSHandshakeTimeout: 30 * time.Second,
			DisableCompression:  true,
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     90 * time.Second,
		}}
	}
	s := &Store{
		opts:  opts,
		db:    opts.DB,
		log:   opts.Log,
		files: filepath.Join(opts.Root, "files"),
		tmp:   filepath.Join(opts.Root, "tmp"),
	}
	for _, dir := range []string{s.files, s.tmp} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("open store: %w", err)
		}
	}
	if opts.APIServer != "" || opts.IPFSGateway != "" {
		s.remote = &remote{
			api:     strings.TrimRight(opts.APIServer, "/"),
			gateway: strings.TrimRight(opts.IPFSGateway, "/"),
			client:  opts.Client,
			timeout: opts.StallTimeout,
		}
	}
	return s, ctx.Err()
}

func (s *Store) blobPath(sha256 string) string { return filepath.Join(s.files, sha256) }
