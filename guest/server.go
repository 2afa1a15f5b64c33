package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"
)

// Agent is the guest's side of the control protocol: the init implements
// it and ServeSession calls it for each request.
type Agent interface {
	// Subscribe returns the current status and the events that follow it,
	// until ctx ends.
	Subscribe(ctx context.Context) (Status, <-chan Event)
	Status() Status
	// Logs calls fn with the retained lines, then, with follow, with every
	// new line until ctx ends.
	Logs(ctx context.Context, follow bool, fn func(LogLine) error) error
	Signal(sig syscall.Signal) error
	Exec(ctx context.Context, req ExecRequest) (ExecResult, error)
	Sysinfo() (Sysinfo, error)
	// Halt stops the workload and every process, and unmounts the drives.
	Halt(ctx context.Context) error
	// PowerOff ends the VM; it is called after Halt's reply is sent.
	PowerOff()
}

// EventAgent is an Agent that takes the messages a program subscribes to.
type EventAgent interface {
	// DeliverEvent calls the workload with the message (its JSON).
	DeliverEvent(ctx context.Context, body []byte) error
}

// APIAgent is an Agent that serves the guest API (api.go).
type APIAgent interface {
	APIBridge() *APIBridge
}

// ResumeAgent is an Agent that can be restored from a template.
type ResumeAgent interface {
	// Resume sets the clock and the entropy pool from req and carries on
	// as after a boot; it returns once the clock and the pool are set.
	Resume(ctx context.Context, req ResumeRequest) error
}

// haltLinger is how long the guest waits, after replying to a halt, for
// the host to close the session before it powers off, so that the reply
// is not lost.
const haltLinger = time.Second

// ServeSession serves one session of the control protocol: requests are
// read from r, replies and events written to w, until r reaches EOF or ctx
// ends. Requests are served concurrently; their replies are interleaved
// line by line.
func ServeSession(ctx context.Context, r io.Reader, w io.Writer, version string, agent Agent) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := &session{w: w, agent: agent, version: version, calls: map[uint64]context.CancelFunc{}, eof: make(chan struct{})}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	lr := newLineReader(r)
	for {
		line, err := lr.next()
		if err != nil {
			close(s.eof)
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if len(line) == 0 {
			continue // the host starts a session with an empty line
		}
		var req request
		if err := json.Unmarshal(line, &req); err != nil {
			continue // the tail of a line from an earlier session
		}
		if req.Op == opCancel {
			s.mu.Lock()
			if stop, ok := s.calls[req.Target]; ok {
				stop()
			}
			s.mu.Unlock()
			continue
		}
		callCtx, stop := context.WithCancel(ctx)
		s.mu.Lock()
		s.calls[req.ID] = stop
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				stop()
				s.mu.Lock()
				delete(s.calls, req.ID)
				s.mu.Unlock()
			}()
			s.serve(callCtx, ctx, &wg, req)
		}()
	}
}

type session struct {
	wmu     sync.Mutex
	w       io.Writer
	agent   Agent
	version string

	mu         sync.Mutex
	calls      map[uint64]context.CancelFunc
	subscribed bool
	eof        chan struct{} // closed when the host ends the session
}

func (s *session) send(r reply) error {
	line, err := json.Marshal(r)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	s.wmu.Lock()
	defer s.wmu.Unlock()
	_, err = s.w.Write(line)
	return err
}

func (s *session) fail(id uint64, err error) {
	s.send(reply{ID: id, Done: true, Error: err.Error()})
}

func (s *session) serve(ctx, sessionCtx context.Context, wg *sync.WaitGroup, req request) {
	a := s.agent
	switch req.Op {
	case opHello:
		s.mu.Lock()
		first := !s.subscribed
		s.subscribed = true
		s.mu.Unlock()
		if !first {
			s.send(reply{ID: req.ID, Done: true, Hello: &Hello{Protocol: ProtocolVersion, InitVersion: s.version, Status: a.Status()}})
			return
		}
		status, events := a.Subscribe(sessionCtx)
		if s.send(reply{ID: req.ID, Done: true, Hello: &Hello{Protocol: ProtocolVersion, InitVersion: s.version, Status: status}}) != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case ev, ok := <-events:
					if !ok || s.send(reply{Event: &ev}) != nil {
						return
					}
				case <-sessionCtx.Done():
					return
				}
			}
		}()
	case opStatus:
		st := a.Status()
		s.send(reply{ID: req.ID, Done: true, Status: &st})
	case opLogs:
		err := a.Logs(ctx, req.Follow, func(l LogLine) error {
			return s.send(reply{ID: req.ID, Log: &l})
		})
		if err != nil && !(req.Follow && ctx.Err() != nil) {
			s.fail(req.ID, err)
			return
		}
		s.send(reply{ID: req.ID, Done: true})
	case opSignal:
		if err := a.Signal(syscall.Signal(req.Signal)); err != nil {
			s.fail(req.ID, err)
			return
		}
		s.send(reply{ID: req.ID, Done: true})
	case opExec:
		if req.Exec == nil || len(req.Exec.Argv) == 0 {
			s.fail(req.ID, errors.New("exec: no command"))
			return
		}
		res, err := a.Exec(ctx, *req.Exec)
		if err != nil {
			s.fail(req.ID, err)
			return
		}
		s.send(reply{ID: req.ID, Done: true, Exec: &res})
	case opSysinfo:
		info, err := a.Sysinfo()
		if err != nil {
			s.fail(req.ID, err)
			return
		}
		s.send(reply{ID: req.ID, Done: true, Sysinfo: &info})
	case opHalt:
		if err := a.Halt(ctx); err != nil {
			s.fail(req.ID, err)
		} else {
			s.send(reply{ID: req.ID, Done: true})
		}
		select {
		case <-s.eof:
		case <-time.After(haltLinger):
		}
		a.PowerOff()
	case opAPI, opAPIReply:
		s.serveAPI(ctx, req)
	case opEvent:
		ea, ok := a.(EventAgent)
		if !ok {
			s.fail(req.ID, errors.New("this init takes no events"))
			return
		}
		if err := ea.DeliverEvent(ctx, req.Body); err != nil {
			s.fail(req.ID, err)
			return
		}
		s.send(reply{ID: req.ID, Done: true})
	case opResume:
		ra, ok := a.(ResumeAgent)
		switch {
		case !ok:
			s.fail(req.ID, errors.New("this init cannot be resumed"))
		case req.Resume == nil:
			s.fail(req.ID, errors.New("resume: no clock or seed"))
		default:
			if err := ra.Resume(ctx, *req.Resume); err != nil {
				s.fail(req.ID, err)
				return
			}
			s.send(reply{ID: req.ID, Done: true})
		}
	default:
		s.fail(req.ID, fmt.Errorf("unknown operation %q", req.Op))
	}
}

// serveAPI hands the workload's guest API calls to the host for as long
// as its "api" call lasts, and the host's answers back to them.
func (s *session) serveAPI(ctx context.Context, req request) {
	agent, ok := s.agent.(APIAgent)
	var b *APIBridge
	if ok {
		b = agent.APIBridge()
	}
	if b == nil {
		s.fail(req.ID, errNoAPI)
		return
	}
	if req.Op == opAPIReply {
		if req.Answer != nil {
			b.answer(*req.Answer)
		}
		s.send(reply{ID: req.ID, Done: true})
		return
	}
	b.serve(ctx, func(c APICall) error { return s.send(reply{ID: req.ID, API: &c}) })
	s.send(reply{ID: req.ID, Done: true})
}
