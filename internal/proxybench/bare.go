package proxybench

import (
	"bytes"
	"net"
	"strconv"
	"syscall"
	"testing"
	"unsafe"
)

// StartBare runs, in this process, the least a Go proxy of the node's
// fast-path design can do: a goroutine per client connection with a kept-alive
// upstream connection of its own, the head passed on with two headers
// added, the answer (a Content-Length) passed back, reads and writes by
// raw system calls waiting through Go's poller as the fast path's. No
// limits, timeouts, pool or checks: a baseline for the proxy benchmarks,
// to tell the node's own work from what Go's runtime and the kernel cost.
// It returns the proxy's address.
func StartBare(b testing.TB, upstream string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go bareServe(c, upstream)
		}
	}()
	return ln.Addr().String()
}

func bareServe(c net.Conn, upstream string) {
	defer c.Close()
	u, err := net.Dial("tcp", upstream)
	if err != nil {
		return
	}
	defer u.Close()
	cr, ur := newBareIO(c), newBareIO(u)
	cbuf, ubuf, out := make([]byte, 8192), make([]byte, 65536), make([]byte, 0, 8192)
	cn := 0
	for {
		m := cr.read(cbuf[cn:])
		if m <= 0 {
			return
		}
		cn += m
		end := bytes.Index(cbuf[:cn], []byte("\r\n\r\n"))
		if end < 0 {
			continue
		}
		out = append(out[:0], cbuf[:end+2]...)
		out = append(out, "X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"...)
		if !ur.write(out) {
			return
		}
		cn = 0
		un, want := 0, 0
		for un < want || want == 0 {
			m := ur.read(ubuf[un:])
			if m <= 0 {
				return
			}
			un += m
			if want != 0 {
				continue
			}
			e := bytes.Index(ubuf[:un], []byte("\r\n\r\n"))
			if e < 0 {
				continue
			}
			i := bytes.Index(bytes.ToLower(ubuf[:e]), []byte("content-length: "))
			if i < 0 {
				return
			}
			j := bytes.IndexByte(ubuf[i:e+2], '\r')
			l, _ := strconv.Atoi(string(ubuf[i+len("content-length: ") : i+j]))
			want = e + 4 + l
		}
		if !cr.write(ubuf[:want]) {
			return
		}
	}
}

type bareIO struct {
	rc  syscall.RawConn
	buf []byte
	n   uintptr
	e   syscall.Errno
}

func newBareIO(c net.Conn) *bareIO {
	rc, _ := c.(*net.TCPConn).SyscallConn()
	return &bareIO{rc: rc}
}

func (r *bareIO) read(p []byte) int {
	r.buf = p
	if err := r.rc.Read(func(fd uintptr) bool {
		r.n, _, r.e = syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)))
		return r.e != syscall.EAGAIN
	}); err != nil || r.e != 0 {
		return -1
	}
	return int(r.n)
}

func (r *bareIO) write(p []byte) bool {
	for len(p) > 0 {
		r.buf = p
		if err := r.rc.Write(func(fd uintptr) bool {
			r.n, _, r.e = syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)))
			return r.e != syscall.EAGAIN
		}); err != nil || r.e != 0 {
			return false
		}
		p = p[r.n:]
	}
	return true
}
