// Package backup makes, keeps, serves and restores on-demand backups of
// QEMU instances' disks, with the reference's routes and files
// (docs/network-routes.md): a tar of compressed standalone qcow2 copies
// (rootfs.qcow2, and the writable volumes when asked) with its sha256 and
// meta sidecars in the backups directory, downloadable through a
// presigned URL, expiring after a day; and the restore of an instance's
// root disk from an uploaded qcow2 or a stored item.
//
// A backup copies a disk at one point in time: the guest's filesystems
// frozen by its qemu-guest-agent when it answers ("frozen"), else the VM
// paused ("crash"), in both cases only for the copy itself; the answer
// says which. A backup or restore of one VM excludes any other of it.
package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/alephvm/alephvm/diskusage"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

// Defaults of Options.
const (
	DefaultMaxAge = 24 * time.Hour
	DefaultKeep   = 1
	// DefaultMaxUpload is the reference's MAX_RESTORE_UPLOAD_BYTES.
	DefaultMaxUpload = 100 << 30
)

// How long the guest agent is given: to answer at all, to freeze (the
// reference's 30 s) and to thaw.
const (
	agentAnswerTimeout = 10 * time.Second
	freezeTimeout      = 30 * time.Second
	thawTimeout        = 30 * time.Second
	// resultTTL is how long the outcome of a finished backup is kept
	// for GET, as the reference's _BACKUP_RESULT_TTL.
	resultTTL = time.Hour
)

// VM is a running VM as a backup copies it.
type VM struct {
	Disks []Disk
	// GuestAgent is the host end of its guest agent's channel; empty
	// when it has none.
	GuestAgent string
	// Pauser pauses its vCPUs for a copy the guest agent cannot make
	// consistent.
	Pauser Pauser
}

// Pauser pauses and resumes a VM (qemu.VM).
type Pauser interface {
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
}

// Instances finds the VMs to back up and puts a restored root disk in
// place (instance.Manager). Their errors carry the HTTP status the
// routes answer (400 for a VM that is not a running QEMU instance, 404
// for one the node does not host).
type Instances interface {
	// BackupVM describes running instance ref's disks: its root disk,
	// and its writable volumes when volumes is set.
	BackupVM(ctx context.Context, ref message.ItemHash, volumes bool) (VM, error)
	// RootDiskSizeMiB is the root disk size its message gives a QEMU
	// instance: what a restored disk may not exceed.
	RootDiskSizeMiB(ctx context.Context, ref message.ItemHash) (int64, error)
	// ReplaceRootDisk stops the instance, puts the qcow2 at path in
	// place of its root disk (moving it, or copying it when move is
	// false) and starts it; the previous disk is kept until the instance
	// has booted from the new one.
	ReplaceRootDisk(ctx context.Context, ref message.ItemHash, path string, move bool) error
}

// Store fetches a stored item, pinned until released (store.Store), for
// a restore by volume_ref.
type Store interface {
	Fetch(ctx context.Context, ref message.ItemHash, useLatest bool) (*store.Item, error)
}

// Options configure the backups.
type Options struct {
	// Dir keeps the backups (BACKUP_DIRECTORY).
	Dir string
	// Keep is how many backups of one VM are kept. With 1 (the default),
	// a backup younger than MaxAge is answered again rather than made
	// anew, as in the reference; with more, each call makes a new one
	// and the oldest beyond Keep is removed once it is complete.
	Keep int
	// MaxAge is how long a backup is kept (24 h by default, the
	// reference's); expired ones are removed when the routes are called.
	MaxAge time.Duration
	// Compression of the copies' clusters: Zstd (the default) or Zlib.
	Compression string
	// MaxUpload bounds an uploaded root disk (MAX_RESTORE_UPLOAD_BYTES),
	// besides the instance's rootfs.size_mib.
	MaxUpload int64
	// Secret signs download URLs (LoadSecret); Domain is their host.
	Secret string
	Domain string
	// Space promises the disk a backup or an upload may take (its disks'
	// virtual sizes) before it is made: 507 when it cannot. Nil checks
	// nothing.
	Space     *diskusage.Ledger
	Instances Instances
	Store     Store
	Now       func() time.Time
	Log       *slog.Logger
}

// Manager runs backups and restores.
type Manager struct {
	opts Options
	mu   sync.Mutex
	vms  map[message.ItemHash]*vmState
}

// vmState is what one VM's backup or restore is doing, and the outcome of
// its last backup.
type vmState struct {
	busy   string // "backup" or "restore" while one runs
	result *result
}

type result struct {
	at   time.Time
	meta Meta
	err  error
}

// New returns the manager; it removes what a crashed backup left in Dir.
func New(opts Options) (*Manager, error) {
	if opts.Keep <= 0 {
		opts.Keep = DefaultKeep
	}
	if opts.MaxAge <= 0 {
		opts.MaxAge = DefaultMaxAge
	}
	switch opts.Compression {
	case "":
		opts.Compression = Zstd
	case Zstd, Zlib:
	default:
		return nil, fmt.Errorf("backup compression %q: zstd or zlib", opts.Compression)
	}
	if opts.MaxUpload <= 0 {
		opts.MaxUpload = DefaultMaxUpload
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("backups directory: %w", err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(opts.Dir, workPrefix+"*"))
	for _, l := range leftovers {
		if err := os.RemoveAll(l); err != nil {
			return nil, fmt.Errorf("remove an unfinished backup: %w", err)
		}
	}
	return &Manager{opts: opts, vms: map[message.ItemHash]*vmState{}}, nil
}

// Answer is what a backup route answers: Status 200 with Meta, 202 in
// progress, or an error status with Text.
type Answer struct {
	Status int
	Meta   *Meta
	Text   string
}

var inProgress = Answer{Status: 202}

// Request is a POST …/backup's query.
type Request struct {
	IncludeVolumes bool
	SkipFreeze     bool
}

func (m *Manager) state(ref message.ItemHash) *vmState {
	s, ok := m.vms[ref]
	if !ok {
		s = &vmState{}
		m.vms[ref] = s
	}
	return s
}

// takeResult returns and forgets the outcome of ref's last backup, if it
// is recent, as the reference pops it.
func (m *Manager) takeResultLocked(ref message.ItemHash) (*Answer, bool) {
	s := m.vms[ref]
	if s == nil || s.result == nil {
		return nil, false
	}
	r := s.result
	s.result = nil
	if m.opts.Now().Sub(r.at) > resultTTL {
		return nil, false
	}
	if r.err != nil {
		return &Answer{Status: 500, Text: "Backup failed: " + r.err.Error()}, true
	}
	meta := r.meta
	return &Answer{Status: 200, Meta: &meta}, true
}

// Create starts a backup of ref (POST …/backup), or answers one that is
// done, running or still fresh.
func (m *Manager) Create(ctx context.Context, ref message.ItemHash, req Request) (Answer, error) {
	vm, err := m.opts.Instances.BackupVM(ctx, ref, req.IncludeVolumes)
	if err != nil {
		return Answer{}, err
	}
	m.removeExpired()
	m.mu.Lock()
	defer m.mu.Unlock()
	if a, ok := m.takeResultLocked(ref); ok {
		return *a, nil
	}
	st := m.state(ref)
	switch st.busy {
	case "backup":
		return inProgress, nil
	case "restore":
		return Answer{}, refuse(409, "A backup or restore is already in progress for this VM")
	}
	if m.opts.Keep == 1 {
		if meta, ok := m.newest(ref); ok {
			return Answer{Status: 200, Meta: &meta}, nil
		}
	}
	var need int64
	for _, d := range vm.Disks {
		info, err := storage.Inspect(ctx, d.Image)
		if err != nil {
			return Answer{}, fmt.Errorf("size of %s: %w", d.Member, err)
		}
		need += info.VirtualSize
	}
	id := m.freeID(ref)
	work := filepath.Join(m.opts.Dir, workPrefix+id)
	release := func() {}
	if m.opts.Space != nil {
		// The virtual sizes bound what the copies and their tar take,
		// as in the reference; the work directory counts against it.
		release, err = m.opts.Space.Reserve("a backup of "+string(ref), need, work)
		if err != nil {
			return Answer{}, &Error{Status: 507, Msg: "Insufficient disk space: " + err.Error(), Err: err}
		}
	}
	st.busy = "backup"
	go func() {
		defer release()
		meta, err := m.run(context.Background(), ref, id, work, vm, req)
		m.mu.Lock()
		defer m.mu.Unlock()
		st.busy = ""
		st.result = &result{at: m.opts.Now(), meta: meta, err: err}
		if err != nil {
			m.opts.Log.Error("backup failed", "ref", ref, "err", err)
		}
	}()
	return inProgress, nil
}

// Status answers GET …/backup: 202 while one runs, the outcome of the
// last one, else the newest backup kept, else 404.
func (m *Manager) Status(ref message.ItemHash) Answer {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s := m.vms[ref]; s != nil && s.busy == "backup" {
		return inProgress
	}
	if a, ok := m.takeResultLocked(ref); ok {
		return *a
	}
	m.removeExpired()
	if meta, ok := m.newest(ref); ok {
		return Answer{Status: 200, Meta: &meta}
	}
	return Answer{Status: 404, Text: "No backup found for this VM"}
}

// freeID names a new backup of ref: a second one within the same second
// gets the next second's name.
func (m *Manager) freeID(ref message.ItemHash) string {
	t := m.opts.Now()
	for {
		id := newID(string(ref), t)
		if _, err := os.Stat(filepath.Join(m.opts.Dir, id+tarSuffix)); errors.Is(err, os.ErrNotExist) {
			if _, err := os.Stat(filepath.Join(m.opts.Dir, workPrefix+id)); errors.Is(err, os.ErrNotExist) {
				return id
			}
		}
		t = t.Add(time.Second)
	}
}

// newest is the meta of ref's newest backup younger than MaxAge, with a
// new download URL.
func (m *Manager) newest(ref message.ItemHash) (Meta, bool) {
	ids, err := list(m.opts.Dir, string(ref))
	if err != nil {
		return Meta{}, false
	}
	cutoff := m.opts.Now().Add(-m.opts.MaxAge)
	for _, id := range ids {
		st, err := os.Stat(filepath.Join(m.opts.Dir, id+tarSuffix))
		if err != nil || st.ModTime().Before(cutoff) {
			continue
		}
		meta, err := m.meta(ref, id)
		if err != nil {
			m.opts.Log.Warn("unreadable backup", "id", id, "err", err)
			continue
		}
		return meta, true
	}
	return Meta{}, false
}

func (m *Manager) meta(ref message.ItemHash, id string) (Meta, error) {
	meta, err := readMeta(m.opts.Dir, id, m.opts.MaxAge)
	if err != nil {
		return Meta{}, err
	}
	meta.DownloadURL = DownloadURL(m.opts.Domain, m.opts.Secret, id, string(ref), m.opts.Now().Add(SignatureTTL))
	return meta, nil
}

// removeExpired removes the backups, of every VM, older than MaxAge.
func (m *Manager) removeExpired() {
	matches, _ := filepath.Glob(filepath.Join(m.opts.Dir, "*"+tarSuffix))
	cutoff := m.opts.Now().Add(-m.opts.MaxAge)
	for _, p := range matches {
		st, err := os.Stat(p)
		if err != nil || !st.ModTime().Before(cutoff) {
			continue
		}
		id := strings.TrimSuffix(filepath.Base(p), tarSuffix)
		if err := remove(m.opts.Dir, id); err != nil {
			m.opts.Log.Warn("remove an expired backup", "id", id, "err", err)
			continue
		}
		m.opts.Log.Info("expired backup removed", "id", id)
	}
}

// run makes backup id of vm in work, then moves it into the backups
// directory.
func (m *Manager) run(ctx context.Context, ref message.ItemHash, id, work string, vm VM, req Request) (Meta, error) {
	start := m.opts.Now()
	if err := os.Mkdir(work, 0o700); err != nil {
		return Meta{}, err
	}
	defer os.RemoveAll(work)
	tarPath := filepath.Join(work, id+tarSuffix)
	a, err := createArchive(tarPath)
	if err != nil {
		return Meta{}, err
	}
	defer a.close()
	consistency, err := m.copyDisks(ctx, ref, a, filepath.Join(work, "empty.qcow2"), vm, req.SkipFreeze)
	if err != nil {
		return Meta{}, err
	}
	// qemu-img opens the copies by their headers, which it wrote.
	if err := a.check(ctx); err != nil {
		return Meta{}, err
	}
	sum, err := a.finish()
	if err != nil {
		return Meta{}, fmt.Errorf("archive backup %s: %w", id, err)
	}
	stored := storedMeta{VMHash: string(ref), CreatedAt: strings.TrimPrefix(id, string(ref)+"-"), Consistency: consistency}
	for _, c := range a.members {
		stored.SourceSizes = append(stored.SourceSizes, namedSize{Name: c.name, Size: c.sourceSize})
	}
	metaJSON, _ := json.Marshal(stored)
	if err := storage.WriteFileDurable(filepath.Join(m.opts.Dir, id+sumSuffix), []byte(sum+"  "+id+tarSuffix+"\n"), 0o600); err != nil {
		return Meta{}, err
	}
	if err := storage.WriteFileDurable(filepath.Join(m.opts.Dir, id+metaSuffix), metaJSON, 0o600); err != nil {
		return Meta{}, err
	}
	if err := os.Rename(tarPath, filepath.Join(m.opts.Dir, id+tarSuffix)); err != nil {
		remove(m.opts.Dir, id)
		return Meta{}, err
	}
	m.trim(ref)
	meta, err := m.meta(ref, id)
	if err != nil {
		return Meta{}, err
	}
	m.opts.Log.Info("backup made", "ref", ref, "id", id, "consistency", consistency, "size", meta.Size,
		"took", m.opts.Now().Sub(start).Round(time.Millisecond))
	return meta, nil
}

// trim removes ref's oldest backups beyond Keep.
func (m *Manager) trim(ref message.ItemHash) {
	ids, err := list(m.opts.Dir, string(ref))
	if err != nil {
		return
	}
	for i := m.opts.Keep; i < len(ids); i++ {
		if err := remove(m.opts.Dir, ids[i]); err != nil {
			m.opts.Log.Warn("remove an old backup", "id", ids[i], "err", err)
		}
	}
}

// copyDisks copies vm's disks into the archive at one point in time: the
// guest's filesystems frozen by its agent, or else the VM paused, only for
// the copies; the guest is always thawed or resumed, whatever fails.
func (m *Manager) copyDisks(ctx context.Context, ref message.ItemHash, a *archive, scratch string, vm VM, skipFreeze bool) (Consistency, error) {
	consistency, settle, err := Quiesce(ctx, vm, skipFreeze, m.opts.Log.With("ref", ref))
	if err != nil {
		return "", err
	}
	defer settle()
	for _, d := range vm.Disks {
		if err := a.add(ctx, d, m.opts.Compression, scratch); err != nil {
			return "", err
		}
	}
	return consistency, nil
}

// Quiesce holds vm's disks at one point in time for a copy: the guest's
// filesystems frozen by its agent (unless skipFreeze), or else the VM
// paused. settle thaws or resumes it; call it whatever the copy did.
func Quiesce(ctx context.Context, vm VM, skipFreeze bool, log *slog.Logger) (Consistency, func(), error) {
	if !skipFreeze && vm.GuestAgent != "" {
		if thaw := freeze(ctx, vm.GuestAgent, log); thaw != nil {
			return Frozen, thaw, nil
		}
	}
	if vm.Pauser == nil {
		return "", nil, errors.New("the VM can be neither frozen nor paused")
	}
	if err := vm.Pauser.Pause(ctx); err != nil {
		return "", nil, fmt.Errorf("pause the VM: %w", err)
	}
	return Crash, func() {
		if err := vm.Pauser.Resume(context.WithoutCancel(ctx)); err != nil {
			log.Error("resume the VM after a copy of its disks", "err", err)
		}
	}, nil
}

// freeze freezes the guest's filesystems through its agent and returns
// what thaws them, or nil when the agent does not answer or refuses.
// A freeze that failed or timed out may still have frozen some
// filesystems: they are thawed before nil is returned.
func freeze(ctx context.Context, socket string, log *slog.Logger) (thaw func()) {
	ga, err := qemu.DialGuestAgent(ctx, socket, agentAnswerTimeout)
	if err != nil {
		log.Info("no guest agent: the backup is crash-consistent", "err", err)
		return nil
	}
	thawNow := func() {
		defer func() { ga.Close() }() // the last connection, after a redial
		for attempt := 1; ; attempt++ {
			n, err := ga.Thaw(context.WithoutCancel(ctx), thawTimeout)
			if err == nil {
				log.Info("guest filesystems thawed", "count", n)
				return
			}
			log.Error("thaw the guest's filesystems", "attempt", attempt, "err", err)
			if attempt == 3 {
				return
			}
			// The channel may hold a late answer: start afresh.
			ga.Close()
			if ga, err = qemu.DialGuestAgent(context.WithoutCancel(ctx), socket, agentAnswerTimeout); err != nil {
				log.Error("reach the guest agent to thaw", "err", err)
				return
			}
		}
	}
	n, err := ga.Freeze(ctx, freezeTimeout)
	if err != nil {
		log.Warn("the guest agent did not freeze: the backup is crash-consistent", "err", err)
		thawNow()
		return nil
	}
	log.Info("guest filesystems frozen", "count", n)
	return thawNow
}

// Download is a backup file to stream, with the reference's headers.
type Download struct {
	*os.File
	Name       string
	Checksum   string // hex sha256, empty when unknown
	SourceSize int64
	ModTime    time.Time
}

// Open opens backup id of ref for a download through its presigned URL.
func (m *Manager) Open(ref message.ItemHash, id, signature, expires string) (*Download, error) {
	if err := ValidateID(id, string(ref)); err != nil {
		return nil, err
	}
	if err := Verify(m.opts.Secret, id, string(ref), signature, expires, m.opts.Now()); err != nil {
		return nil, err
	}
	m.removeExpired()
	f, err := os.Open(filepath.Join(m.opts.Dir, id+tarSuffix))
	if errors.Is(err, os.ErrNotExist) {
		return nil, refuse(404, "Backup %s not found", id)
	} else if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	sum, _ := readChecksum(m.opts.Dir, id)
	return &Download{File: f, Name: id + tarSuffix, Checksum: sum, SourceSize: sourceSize(m.opts.Dir, id), ModTime: st.ModTime()}, nil
}

// Delete removes backup id of ref and its sidecars.
func (m *Manager) Delete(ref message.ItemHash, id string) error {
	if err := ValidateID(id, string(ref)); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(m.opts.Dir, id+tarSuffix)); errors.Is(err, os.ErrNotExist) {
		return refuse(404, "Backup %s not found", id)
	}
	if err := remove(m.opts.Dir, id); err != nil {
		return err
	}
	m.opts.Log.Info("backup deleted", "ref", ref, "id", id)
	return nil
}
