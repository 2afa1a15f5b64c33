package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// The guest API: the HTTP calls a program makes to the node from inside
// its VM (the Aleph SDK's cache, signing and core node API), on a unix
// socket the init serves (APISocket). They travel on the control channel:
// the host opens a long call (op "api"), the guest sends each call of the
// workload as a line of that call's replies, and the host answers each
// with a request of its own (op "api_reply"). No network path into the
// host is opened for them.

// APISocket is where the init serves the guest API, and what the SDK's
// environment (ALEPH_API_UNIX_SOCKET) names, as the reference's runtime.
const APISocket = "/tmp/socat-socket"

// Bounds of the guest API, the same on both sides.
const (
	// MaxAPIRequest bounds a call's body.
	MaxAPIRequest = 1 << 20
	// MaxAPIAnswer bounds an answer's body.
	MaxAPIAnswer = 2 << 20
	// MaxAPICalls bounds the calls of one VM under way at once; more are
	// answered 429.
	MaxAPICalls = 8
	// maxAPIPath bounds a call's path and query, and maxAPIWord its method
	// and content type.
	maxAPIPath = 8 << 10
	maxAPIWord = 256
	// apiTimeout bounds a call, from the workload's request to the host's
	// answer: past it the workload gets a 504.
	apiTimeout = 60 * time.Second
)

// APICall is one HTTP request of the workload to the guest API.
type APICall struct {
	ID          uint64 `json:"id"`
	Method      string `json:"method"`
	Path        string `json:"path"` // with its query, as the workload sent it
	ContentType string `json:"content_type,omitempty"`
	Body        []byte `json:"body,omitempty"`
}

// APIAnswer is the host's answer to an APICall.
type APIAnswer struct {
	Call        uint64 `json:"call"`
	Status      int    `json:"status"`
	ContentType string `json:"content_type,omitempty"`
	Body        []byte `json:"body,omitempty"`
}

// valid reports whether a call from the guest is within the bounds.
func (c *APICall) valid() bool {
	return c.ID != 0 && len(c.Method) <= maxAPIWord && len(c.ContentType) <= maxAPIWord &&
		len(c.Path) <= maxAPIPath && len(c.Body) <= MaxAPIRequest && len(c.Path) > 0 && c.Path[0] == '/'
}

// APIHandler answers the calls of one VM's workload.
type APIHandler func(ctx context.Context, call APICall) APIAnswer

// ServeAPI serves the guest's API calls with h, MaxAPICalls at a time,
// until ctx ends or the session does. Calls past the bound, or outside the
// protocol's bounds, are dropped: the guest's own bounds keep a well-made
// init under them, and its calls then time out.
func (c *Client) ServeAPI(ctx context.Context, h APIHandler) error {
	calls := make(chan APICall, MaxAPICalls)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, MaxAPICalls)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case call := <-calls:
				select {
				case sem <- struct{}{}:
				default:
					continue // past the bound: dropped
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer func() { <-sem }()
					ans := h(ctx, call)
					if ctx.Err() != nil {
						// Served past the end of serving: the guest
						// fails the call itself (502), and an answer
						// now would race that.
						return
					}
					ans.Call = call.ID
					if len(ans.Body) > MaxAPIAnswer {
						ans = APIAnswer{Call: call.ID, Status: http.StatusBadGateway, Body: []byte("the answer is larger than the guest API allows")}
					}
					c.call(ctx, request{Op: opAPIReply, Answer: &ans}, nil)
				}()
			case <-ctx.Done():
				return
			}
		}
	}()
	_, err := c.callWith(ctx, request{Op: opAPI}, &call{final: make(chan reply, 1), api: calls})
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		return fmt.Errorf("guest API: %w", err)
	}
	return nil
}

// APIBridge is the guest's side: an http.Handler for the init's socket
// that hands each call to the host through the session that serves the
// API, and writes the host's answer back.
type APIBridge struct {
	mu      sync.Mutex
	send    func(APICall) error // the serving session's, nil when none
	stopped chan struct{}       // closed when that session stops serving
	next    uint64
	pending map[uint64]chan APIAnswer
	sem     chan struct{}
}

// NewAPIBridge returns a bridge with no session serving it yet.
func NewAPIBridge() *APIBridge {
	return &APIBridge{pending: map[uint64]chan APIAnswer{}, sem: make(chan struct{}, MaxAPICalls)}
}

// serve makes send the way to the host until ctx ends: the host's "api"
// call. A later session replaces an earlier one.
func (b *APIBridge) serve(ctx context.Context, send func(APICall) error) {
	stopped := make(chan struct{})
	b.mu.Lock()
	if b.stopped != nil {
		close(b.stopped)
	}
	b.send, b.stopped = send, stopped
	b.mu.Unlock()
	<-ctx.Done()
	b.mu.Lock()
	if b.stopped == stopped {
		close(stopped)
		b.send, b.stopped = nil, nil
	}
	b.mu.Unlock()
}

// answer hands the host's answer to the waiting call, if any.
func (b *APIBridge) answer(a APIAnswer) {
	b.mu.Lock()
	ch := b.pending[a.Call]
	delete(b.pending, a.Call)
	b.mu.Unlock()
	if ch != nil {
		ch <- a
	}
}

func (b *APIBridge) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	select {
	case b.sem <- struct{}{}:
		defer func() { <-b.sem }()
	default:
		http.Error(w, "too many guest API calls at once", http.StatusTooManyRequests)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, MaxAPIRequest+1))
	if err != nil {
		http.Error(w, "read the request: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(body) > MaxAPIRequest {
		http.Error(w, "request body larger than "+strconv.Itoa(MaxAPIRequest)+" bytes", http.StatusRequestEntityTooLarge)
		return
	}
	path := r.URL.RequestURI()
	if len(path) > maxAPIPath || len(r.Method) > maxAPIWord || len(r.Header.Get("Content-Type")) > maxAPIWord {
		http.Error(w, "request line or headers too long", http.StatusRequestURITooLong)
		return
	}
	ch := make(chan APIAnswer, 1)
	b.mu.Lock()
	send, stopped := b.send, b.stopped
	b.next++
	id := b.next
	if send != nil {
		b.pending[id] = ch
	}
	b.mu.Unlock()
	if send == nil {
		http.Error(w, "the node is not serving the guest API", http.StatusServiceUnavailable)
		return
	}
	defer func() {
		b.mu.Lock()
		delete(b.pending, id)
		b.mu.Unlock()
	}()
	if err := send(APICall{ID: id, Method: r.Method, Path: path, ContentType: r.Header.Get("Content-Type"), Body: body}); err != nil {
		http.Error(w, "the node's channel failed: "+err.Error(), http.StatusBadGateway)
		return
	}
	timer := time.NewTimer(apiTimeout)
	defer timer.Stop()
	select {
	case a := <-ch:
		if a.ContentType != "" {
			w.Header().Set("Content-Type", a.ContentType)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(a.Body)))
		w.WriteHeader(validStatus(a.Status))
		w.Write(a.Body)
	case <-stopped:
		// The host's session ended before it answered.
		http.Error(w, "the node's session ended before it answered", http.StatusBadGateway)
	case <-timer.C:
		http.Error(w, "the node did not answer in time", http.StatusGatewayTimeout)
	case <-r.Context().Done():
	}
}

// validStatus keeps a host's status within HTTP's.
func validStatus(s int) int {
	if s < 100 || s > 999 {
		return http.StatusBadGateway
	}
	return s
}

// errNoAPI is a guest's answer to an "api" call when its init serves no
// guest API.
var errNoAPI = errors.New("this init serves no guest API")

// MaxEvent bounds a message delivered to a workload.
const MaxEvent = 2 << 20

// DeliverEvent hands a message the program subscribes to to its workload
// (its ASGI app, under the init's event wrapper) and waits until the app
// has taken it.
func (c *Client) DeliverEvent(ctx context.Context, body []byte) error {
	if len(body) > MaxEvent {
		return fmt.Errorf("guest event: %d bytes, more than %d", len(body), MaxEvent)
	}
	if _, err := c.call(ctx, request{Op: opEvent, Body: body}, nil); err != nil {
		return fmt.Errorf("guest event: %w", err)
	}
	return nil
}
