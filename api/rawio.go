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
type rawIO struct {
	conn net.Conn
	rc   syscall.RawConn
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
	return &rawIO{conn: c, rc: rc}
}

func (r *rawIO) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n uintptr
	var errno syscall.Errno
	err := r.rc.Read(func(fd uintptr) bool {
		n, _, errno = syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		return errno != syscall.EAGAIN
	})
	switch {
	case err != nil:
		return 0, r.opError("read", err)
	case errno == syscall.EINTR:
		return r.Read(p)
	case errno != 0:
		return 0, r.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return int(n), nil
}

func (r *rawIO) Write(p []byte) (int, error) {
	var written int
	var errno syscall.Errno
	err := r.rc.Write(func(fd uintptr) bool {
		for written < len(p) {
			n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[written])), uintptr(len(p)-written))
			switch e {
			case 0:
				written += int(n)
			case syscall.EINTR:
			case syscall.EAGAIN:
				return false
			default:
				errno = e
				return true
			}
		}
		return true
	})
	if err == nil && errno != 0 {
		err = os.NewSyscallError("write", errno)
	}
	if err != nil {
		return written, r.opError("write", err)
	}
	return written, nil
}

// opError wraps err as net.Conn's own reads and writes do.
func (r *rawIO) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: r.conn.LocalAddr(), Addr: r.conn.RemoteAddr(), Err: err}
}
