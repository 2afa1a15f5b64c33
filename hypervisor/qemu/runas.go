package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/hypervisor"
)

// Who QEMU runs as (Options.RunAs).
const (
	// RunAsPerVM (the default) gives each VM's QEMU a uid and gid of its
	// own, from Options.FirstUID: a QEMU taken over by its guest can then
	// neither signal nor trace another tenant's QEMU, nor read anything
	// another one made.
	RunAsPerVM = ""
	// RunAsRoot keeps QEMU root, for debugging only.
	RunAsRoot = "root"
)

// DefaultFirstUID is the first of the UIDs uids given to QEMU processes,
// above the jailer's default range (1000000 and the 65536 after it).
const (
	DefaultFirstUID = 1100000
	UIDs            = 65536
)

// identity is who one QEMU runs as.
type identity struct {
	runAs    string // -runas: "uid:gid" or a user name; empty for root
	uid, gid int    // what QEMU must run as once started
}

// runAsPolicy chooses the identity of each VM's QEMU.
type runAsPolicy struct {
	mode   string    // RunAsPerVM, RunAsRoot, or a user
	shared identity  // of a named user
	uids   *uidRange // per VM
}

// newRunAsPolicy checks runAs: a named user (or uid:gid) must exist and
// must not be uid 0 (say root for that).
func newRunAsPolicy(runAs string, firstUID int) (*runAsPolicy, error) {
	p := &runAsPolicy{mode: runAs}
	switch runAs {
	case RunAsRoot:
		p.shared = identity{uid: 0, gid: 0}
	case RunAsPerVM:
		if firstUID == 0 {
			firstUID = DefaultFirstUID
		}
		if firstUID < 1 || firstUID > 1<<32-2-UIDs {
			return nil, fmt.Errorf("qemu: the first uid of VMs must be between 1 and %d, got %d", 1<<32-2-UIDs, firstUID)
		}
		p.uids = &uidRange{first: firstUID, count: UIDs, proc: "/proc", locks: uidLockDir, starting: map[int]*os.File{}}
	default:
		id, err := lookupRunAs(runAs)
		if err != nil {
			return nil, err
		}
		p.shared = id
	}
	return p, nil
}

// lookupRunAs resolves a user name, or "uid:gid", for -runas.
func lookupRunAs(runAs string) (identity, error) {
	id := identity{runAs: runAs}
	if u, g, ok := strings.Cut(runAs, ":"); ok {
		uid, err1 := strconv.ParseUint(u, 10, 32)
		gid, err2 := strconv.ParseUint(g, 10, 32)
		if err1 != nil || err2 != nil {
			return identity{}, fmt.Errorf("qemu: run as %q: want a user name or uid:gid", runAs)
		}
		id.uid, id.gid = int(uid), int(gid)
	} else {
		u, err := user.Lookup(runAs)
		if err != nil {
			return identity{}, fmt.Errorf("qemu: run as %q: %w", runAs, err)
		}
		id.uid, _ = strconv.Atoi(u.Uid)
		id.gid, _ = strconv.Atoi(u.Gid)
	}
	if id.uid == 0 || id.gid == 0 {
		return identity{}, fmt.Errorf("qemu: run as %q: that is uid or gid 0; set %q to run QEMU as root", runAs, RunAsRoot)
	}
	return id, nil
}

// take returns the identity of a new VM's QEMU; release must be called
// once that QEMU runs as it (or failed to start).
func (p *runAsPolicy) take() (identity, func(), error) {
	if p.uids == nil {
		return p.shared, func() {}, nil
	}
	uid, err := p.uids.take()
	if err != nil {
		return identity{}, nil, err
	}
	id := identity{runAs: fmt.Sprintf("%d:%d", uid, uid), uid: uid, gid: uid}
	return id, func() { p.uids.release(uid) }, nil
}

// String says who QEMU runs as, for logs and doctor.
func (p *runAsPolicy) String() string {
	switch {
	case p.uids != nil:
		return fmt.Sprintf("a uid and gid of its own per VM (%d to %d)", p.uids.first, p.uids.first+p.uids.count-1)
	case p.mode == RunAsRoot:
		return "root"
	}
	return fmt.Sprintf("%s (uid %d, gid %d), shared by every VM", p.mode, p.shared.uid, p.shared.gid)
}

// Describe says who QEMU runs as under the settings runAs and firstUID
// (Options), for alephvm doctor, or why QEMU cannot run as it.
func Describe(runAs string, firstUID int) (string, error) {
	p, err := newRunAsPolicy(runAs, firstUID)
	if err != nil {
		return "", err
	}
	if runAs == RunAsRoot {
		return "root (QEMU_RUNAS=root: for debugging only)", nil
	}
	return p.String(), nil
}

// uidLockDir holds a lock file per uid of the range, locked by the node
// process that starts a QEMU as that uid until the QEMU runs as it: the
// one place every node process of the host agrees on.
const uidLockDir = "/run/alephvm/qemu-uids"

// uidRange hands out the uids of a range that no process uses: a uid is
// free when no process has it (QEMU opens every file before it drops to
// its uid, so the uid owns nothing on disk) and no start under way took
// it. Processes are found in /proc, so the QEMUs of an earlier node
// process are seen too.
//
// A start under way is seen in another node process of the host (a
// second node, or the tests' nodes side by side) through its lock file in
// locks: until QEMU has dropped to its uid, /proc does not show the uid
// taken, and two processes scanning it then chose the same uid.
type uidRange struct {
	first, count int
	proc         string
	locks        string

	mu       sync.Mutex
	starting map[int]*os.File // the locked file of each uid taken, until released
}

func (r *uidRange) take() (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	used, err := r.inUse()
	if err != nil {
		return 0, fmt.Errorf("qemu: find the uids in use: %w", err)
	}
	for uid := r.first; uid < r.first+r.count; uid++ {
		if used[uid] || r.starting[uid] != nil {
			continue
		}
		lock, err := r.lock(uid)
		if errors.Is(err, errUIDLocked) {
			continue // another process starts a QEMU as uid
		}
		if err != nil {
			return 0, err
		}
		// A process that held the lock until its QEMU dropped to uid let
		// it go before this one took it: /proc shows that QEMU now.
		if used, err = r.inUse(); err != nil {
			lock.Close()
			return 0, fmt.Errorf("qemu: find the uids in use: %w", err)
		}
		if used[uid] {
			lock.Close()
			continue
		}
		r.starting[uid] = lock
		return uid, nil
	}
	return 0, fmt.Errorf("qemu: all %d uids from %d are in use", r.count, r.first)
}

func (r *uidRange) release(uid int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if lock := r.starting[uid]; lock != nil {
		lock.Close() // unlocks it
	}
	delete(r.starting, uid)
}

var errUIDLocked = errors.New("uid locked by another process")

// lock locks uid's file in r.locks, or returns errUIDLocked. The files
// stay: removing one could let two processes lock two files of one name.
func (r *uidRange) lock(uid int) (*os.File, error) {
	if err := os.MkdirAll(r.locks, 0o700); err != nil {
		return nil, fmt.Errorf("qemu: uid locks: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(r.locks, strconv.Itoa(uid)), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("qemu: uid lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errUIDLocked
		}
		return nil, fmt.Errorf("qemu: lock uid %d: %w", uid, err)
	}
	return f, nil
}

// inUse returns the uids and gids of the range that a process has.
func (r *uidRange) inUse() (map[int]bool, error) {
	return hypervisor.UIDsInUse(r.proc, r.first, r.count)
}

// waitDropped waits until QEMU has dropped to id with its sandbox on
// (checkProcess): QMP may answer from its monitor thread just before
// QEMU's main thread drops.
func waitDropped(ctx context.Context, pid int, id identity, exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		err := checkProcess(pid, id)
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("exited (%w)", err)
		case <-ctx.Done():
			return err
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// checkProcess makes sure the process pid runs as id and under a seccomp
// filter: QEMU has dropped its privileges and its sandbox is on.
func checkProcess(pid int, id identity) error {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return err
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	want := func(n int) string { return strings.TrimSpace(strings.Repeat(strconv.Itoa(n)+" ", 4)) }
	var problems []string
	if fields["Uid"] != want(id.uid) || fields["Gid"] != want(id.gid) {
		problems = append(problems, fmt.Sprintf("runs as uid %s, gid %s, not %d:%d", fields["Uid"], fields["Gid"], id.uid, id.gid))
	}
	if fields["Seccomp"] != "2" {
		problems = append(problems, fmt.Sprintf("has no seccomp filter (Seccomp: %q)", fields["Seccomp"]))
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}
