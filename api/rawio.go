package api

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// rawIO reads and writes a connection of the fast path with raw system
// calls on its non-blocking socket, waiting through Go's poller (and so
// within the connection's deadlines) only when the socket is not ready.
//
// Why: a read or write through net.Conn tells the runtime it enters a
// system call; on a slow host (a paravirtualised one, where a loopback
// write also runs the receiver's network stack) many of those last long
// enough for the runtime's monitor to hand the processor to another
// thread and to keep waking up every 20 µs, and each of those thread
// switches cost more than the proxying itself (docs/load.md). A socket
// call that cannot block needs none of that.
//
// A rawIO has one reader and one writer at a time (bufio's), and
// writeThenRead is both; the state of each call is kept in it, so that no
// closure is made per call.
type rawIO struct {
	conn net.Conn
	rc   syscall.RawConn

	rbuf   []byte
	rn     uintptr
	rerrno syscall.Errno
	readFn func(uintptr) bool

	wbuf    []byte
	wn      int
	werrno  syscall.Errno
	writeFn func(uintptr) bool

	writeReadFn func(uintptr) bool
}

// newRawIO returns the raw reads and writes of c, or nil when c has no
// socket to make them on.
func newRawIO(c net.Conn) *rawIO {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	r := &rawIO{conn: c, rc: rc}
	r.readFn, r.writeFn, r.writeReadFn = r.read, r.write, r.writeRead
	return r
}

func (r *rawIO) read(fd uintptr) bool {
	r.rn, _, r.rerrno = syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&r.rbuf[0])), uintptr(len(r.rbuf)))
	return r.rerrno != syscall.EAGAIN
}

func (r *rawIO) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		r.rbuf = p
		err := r.rc.Read(r.readFn)
		r.rbuf = nil
		switch {
		case err != nil:
			return 0, r.opError("read", err)
		case r.rerrno == syscall.EINTR:
			continue
		case r.rerrno != 0:
			return 0, r.opError("read", os.NewSyscallError("read", r.rerrno))
		case r.rn == 0:
			return 0, io.EOF
		}
		return int(r.rn), nil
	}
}

func (r *rawIO) write(fd uintptr) bool {
	for r.wn < len(r.wbuf) {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&r.wbuf[r.wn])), uintptr(len(r.wbuf)-r.wn))
		switch e {
		case 0:
			r.wn += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			r.werrno = e
			return true
		}
	}
	return true
}

func (r *rawIO) Write(p []byte) (int, error) {
	r.wbuf, r.wn, r.werrno = p, 0, 0
	err := r.rc.Write(r.writeFn)
	written := r.wn
	if err == nil && r.werrno != 0 {
		err = os.NewSyscallError("write", r.werrno)
	}
	r.wbuf = nil
	if err != nil {
		return written, r.opError("write", err)
	}
	return written, nil
}

// writeRead is writeThenRead's step: it writes what is left of wbuf,
// then asks to wait (false) for what the write calls for; once woken, it
// reads.
func (r *rawIO) writeRead(fd uintptr) bool {
	if r.wn < len(r.wbuf) {
		// Done when the socket is full (writeThenRead waits to write the
		// rest) or the write failed; else wait for the answer.
		return !r.write(fd) || r.werrno != 0
	}
	return r.read(fd)
}

// writeThenRead writes w, then reads into p the first bytes that come:
// a request, then its answer. The poller's readiness is reset before the
// write, so the answer, which can only come after it, is waited for
// without a read first (Go's reads try the socket before they wait; here
// that read could only find nothing). It returns the bytes read, the
// write's error, and the read's.
func (r *rawIO) writeThenRead(w, p []byte) (int, error, error) {
	if len(p) == 0 {
		_, err := r.Write(w)
		return 0, err, nil
	}
	r.wbuf, r.wn, r.werrno = w, 0, 0
	r.rbuf, r.rn, r.rerrno = p, 0, 0
	err := r.rc.Read(r.writeReadFn)
	r.rbuf = nil
	rest, werrno := r.wbuf[r.wn:], r.werrno
	r.wbuf = nil
	switch {
	case err != nil && len(rest) > 0:
		return 0, r.opError("write", err), nil
	case werrno != 0:
		return 0, r.opError("write", os.NewSyscallError("write", werrno)), nil
	case len(rest) > 0: // the socket was full: the rest waits for room
		if _, err := r.Write(rest); err != nil {
			return 0, err, nil
		}
		n, err := r.Read(p)
		return n, nil, err
	case err != nil:
		return 0, nil, r.opError("read", err)
	case r.rerrno == syscall.EINTR:
		n, err := r.Read(p)
		return n, nil, err
	case r.rerrno != 0:
		return 0, nil, r.opError("read", os.NewSyscallError("read", r.rerrno))
	case r.rn == 0:
		return 0, nil, io.EOF
	}
	return int(r.rn), nil, nil
}

// opError wraps err as net.Conn's own reads and writes do.
func (r *rawIO) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: r.conn.LocalAddr(), Addr: r.conn.RemoteAddr(), Err: err}
}
