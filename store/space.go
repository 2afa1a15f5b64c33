package store

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/message"
)

// Downloads keep the cache filesystem above Options.MinFreeSpace: a
// download is refused when what it expects to write, added to what the
// downloads under way still expect to write, would take the free space
// below the floor; and every write checks the floor again, since a file
// of unknown size, or anything else on that filesystem, can eat the room.

// statfsFree reports the bytes of dir's filesystem available to
// unprivileged users: the root reserve is left to the rest of the host.
func statfsFree(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// reservation is what one download under way still expects to write.
// Only its download's goroutine uses it.
type reservation struct {
	s    *Store
	item message.ItemHash
	left int64
}

// reserve admits a download that expects to write need more bytes (0 when
// its size is unknown), or refuses it with ErrInsufficientStorage.
func (s *Store) reserve(item message.ItemHash, need int64) (*reservation, error) {
	r := &reservation{s: s, item: item}
	if s.opts.MinFreeSpace <= 0 {
		return r, nil
	}
	s.reserveMu.Lock()
	defer s.reserveMu.Unlock()
	// A download of unknown size needs room for one byte at least.
	if err := r.check(max(need, 1), s.reserved.Load()); err != nil {
		return nil, err
	}
	r.left = need
	s.reserved.Add(need)
	return r, nil
}

// check fails if writing n bytes, with others still expected by the other
// downloads, would leave less than the floor free.
func (r *reservation) check(n, others int64) error {
	free, err := r.s.opts.FreeSpace(r.s.tmp)
	if err != nil {
		return fmt.Errorf("download %s: check free space: %w", r.item, err)
	}
	if free-others-n < r.s.opts.MinFreeSpace {
		return fmt.Errorf("download %s: %w: %d bytes free on the cache filesystem, %d expected by other downloads, %d more would leave less than the %d bytes kept free (CACHE_MIN_FREE_SPACE)",
			r.item, ErrInsufficientStorage, free, others, n, r.s.opts.MinFreeSpace)
	}
	return nil
}

// write checks that n more bytes, and the rest of what this download
// expects, fit above the floor beside what the other downloads expect, and
// counts them as written.
func (r *reservation) write(n int64) error {
	if r.s.opts.MinFreeSpace <= 0 {
		return nil
	}
	if err := r.check(max(n, r.left), r.s.reserved.Load()-r.left); err != nil {
		return err
	}
	used := min(n, r.left)
	r.left -= used
	r.s.reserved.Add(-used)
	return nil
}

// release gives back what the download did not write.
func (r *reservation) release() {
	r.s.reserved.Add(-r.left)
	r.left = 0
}
