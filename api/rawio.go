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
// A rawIO has one reader and one writer at a time (bufio's); the state of
// each call is kept in it, so that no closure is made per call.
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
	r.readFn, r.writeFn = r.read, r.write
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

// opError wraps err as net.Conn's own reads and writes do.
func (r *rawIO) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: r.conn.LocalAddr(), Addr: r.conn.RemoteAddr(), Err: err}
}
