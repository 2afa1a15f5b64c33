package api

import (
	"bufio"
	"net"
	"net/http"
	"time"
)

// Observer is told of the requests the API answers, for the node's
// metrics.
type Observer interface {
	// ProgramRequest counts a request to a program: the status it was
	// answered (101 for a websocket, 499 when the client left before any
	// answer) and the time to the answer's headers.
	ProgramRequest(code int, took time.Duration)
	// AllocationCall counts a call of the scheduler's route, by the status
	// answered.
	AllocationCall(route string, code int)
}

// statusWriter notes the status of an answer and when its headers went.
type statusWriter struct {
	http.ResponseWriter
	code int
	at   time.Time
}

func (w *statusWriter) note(code int) {
	if w.code == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.code, w.at = code, time.Now()
	}
}

func (w *statusWriter) WriteHeader(code int) {
	w.note(code)
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	w.note(http.StatusOK)
	return w.ResponseWriter.Write(p)
}

// Hijack is a websocket taken over by the proxy: its 101 is written on
// the connection, past this writer.
func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.note(http.StatusSwitchingProtocols)
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

// Unwrap gives http.ResponseController the writer beneath.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// result is the status answered and the time to it since start; a
// request that ended with nothing written was answered 200 by the server,
// unless its client had left (499, as nginx counts it).
func (w *statusWriter) result(r *http.Request, start time.Time) (int, time.Duration) {
	if w.code == 0 {
		if r.Context().Err() != nil {
			return 499, time.Since(start)
		}
		return http.StatusOK, time.Since(start)
	}
	return w.code, w.at.Sub(start)
}

// observeProgram counts the request to a program that fn serves.
func (s *Server) observeProgram(w http.ResponseWriter, r *http.Request, fn func(http.ResponseWriter)) {
	if s.opts.Observer == nil {
		fn(w)
		return
	}
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	defer func() { s.opts.Observer.ProgramRequest(sw.result(r, start)) }()
	fn(sw)
}

// observeAllocation counts the calls of the scheduler's route that h
// serves.
func (s *Server) observeAllocation(route string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.opts.Observer == nil {
			h(w, r)
			return
		}
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			code, _ := sw.result(r, time.Now())
			s.opts.Observer.AllocationCall(route, code)
		}()
		h(sw, r)
	}
}

// deadlineOf finds the API's own deadlineWriter under w's wrappers.
func deadlineOf(w http.ResponseWriter) (*deadlineWriter, bool) {
	for {
		switch x := w.(type) {
		case *deadlineWriter:
			return x, true
		case interface{ Unwrap() http.ResponseWriter }:
			w = x.Unwrap()
		default:
			return nil, false
		}
	}
}
