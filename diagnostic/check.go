package diagnostic

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/alephvm/alephvm/message"
)

// Checker runs the diagnostic program's checks through the node's own
// program route.
type Checker struct {
	// Node is the node's own base URL (http://SUPERVISOR_HOST:SUPERVISOR_PORT).
	Node string
	// Client makes the calls; nil means one with a 60 s bound per call (a
	// cold start under emulation included).
	Client *http.Client

	runs singleflight.Group
}

// Result is one run of the checks: each sub-check by name, in the
// reference's order, and whether the node passes.
type Result struct {
	Checks []Check
	// Passed is true when every required check passed (the reference's
	// required keys).
	Passed bool
	// Err is set when the node's own route could not be reached at all.
	Err error
}

// Check is one sub-check.
type Check struct {
	Name   string
	Passed bool
}

// required are the checks a node must pass, as the reference's.
var required = map[string]bool{"index": true, "environ": true, "ipv4": true, "internet": true, "dns": true, "error_handling": true, "lifespan": true}

// Body is the result as the reference's route writes it (Python's
// json.dumps): an object of booleans in its order, or {"error": ...}.
func (r Result) Body() []byte {
	var b bytes.Buffer
	if r.Err != nil {
		msg, _ := json.Marshal(r.Err.Error())
		b.WriteString(`{"error": `)
		b.Write(msg)
		b.WriteByte('}')
		return b.Bytes()
	}
	b.WriteByte('{')
	for i, c := range r.Checks {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%q: %t", c.Name, c.Passed)
	}
	b.WriteByte('}')
	return b.Bytes()
}

// Failed names the required checks that failed.
func (r Result) Failed() []string {
	var failed []string
	for _, c := range r.Checks {
		if required[c.Name] && !c.Passed {
			failed = append(failed, c.Name)
		}
	}
	return failed
}

// Run checks the program ref; retro leaves out the checks the reference
// added with its Debian 12 runtime (get_a_message, lifespan). Concurrent
// callers for the same program share one run.
func (c *Checker) Run(ctx context.Context, ref message.ItemHash, retro bool) Result {
	key := fmt.Sprintf("%s/%t", ref, retro)
	ch := c.runs.DoChan(key, func() (any, error) {
		// The run outlives a caller that leaves: others may wait on it.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
		defer cancel()
		return c.run(ctx, ref, retro), nil
	})
	select {
	case res := <-ch:
		return res.Val.(Result)
	case <-ctx.Done():
		return Result{Err: ctx.Err()}
	}
}

func (c *Checker) run(ctx context.Context, ref message.ItemHash, retro bool) Result {
	p := probe{c: c, ctx: ctx, base: strings.TrimSuffix(c.Node, "/") + "/vm/" + string(ref)}
	checks := []struct {
		name string
		run  func() bool
	}{
		{"index", p.index},
		{"environ", p.environ},
		{"messages", p.messages},
		{"dns", p.dns},
		{"ipv4", func() bool { return p.result("/ip/4") }},
		{"internet", p.internet},
		{"cache", p.cache},
		{"persistent_storage", p.persistentStorage},
		{"error_handling", p.errorHandling},
	}
	if !retro {
		checks = append(checks, []struct {
			name string
			run  func() bool
		}{{"get_a_message", p.getAMessage}, {"lifespan", p.lifespan}}...)
	}
	var r Result
	for _, check := range checks {
		r.Checks = append(r.Checks, Check{Name: check.name, Passed: check.run()})
		if p.unreachable != nil {
			return Result{Err: p.unreachable}
		}
	}
	r.Passed = len(r.Failed()) == 0
	return r
}

// probe makes the calls of one run.
type probe struct {
	c           *Checker
	ctx         context.Context
	base        string
	unreachable error // the node itself did not answer
}

// maxAnswer bounds what the checks read of an answer: the program is the
// node's own, but its answers pass through the guest.
const maxAnswer = 1 << 20

// get returns the status and body of GET path on the program.
func (p *probe) get(path string) (int, []byte) {
	client := p.c.Client
	if client == nil {
		client = &http.Client{Timeout: 60 * time.Second}
	}
	req, err := http.NewRequestWithContext(p.ctx, http.MethodGet, p.base+path, nil)
	if err != nil {
		return 0, nil
	}
	resp, err := client.Do(req)
	if err != nil {
		p.unreachable = fmt.Errorf("the node's own program route: %w", err)
		return 0, nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	return resp.StatusCode, body
}

// getJSON decodes the answer to GET path into v; false unless it is a 2xx
// with JSON of v's shape.
func (p *probe) getJSON(path string, v any) bool {
	status, body := p.get(path)
	return status >= 200 && status < 300 && json.Unmarshal(body, v) == nil
}

func (p *probe) index() bool {
	var v struct{ Example string }
	return p.getJSON("/", &v) && v.Example == "example_fastapi"
}

func (p *probe) lifespan() bool {
	var v struct{ Lifespan bool }
	return p.getJSON("/lifespan", &v) && v.Lifespan
}

func (p *probe) environ() bool {
	var v map[string]any
	if !p.getJSON("/environ", &v) {
		return false
	}
	for _, name := range []string{"ALEPH_API_HOST", "ALEPH_API_UNIX_SOCKET", "ALEPH_REMOTE_CRYPTO_HOST", "ALEPH_REMOTE_CRYPTO_UNIX_SOCKET", "ALEPH_ADDRESS_TO_USE"} {
		if _, ok := v[name]; !ok {
			return false
		}
	}
	return true
}

func (p *probe) messages() bool {
	var v struct {
		Messages struct {
			Messages []map[string]any `json:"messages"`
		}
	}
	if !p.getJSON("/messages", &v) || len(v.Messages.Messages) == 0 {
		return false
	}
	_, ok := v.Messages.Messages[0]["item_hash"]
	return ok
}

func (p *probe) dns() bool {
	var v struct{ IPv4, IPv6 any }
	return p.getJSON("/dns", &v) && truthy(v.IPv4) && truthy(v.IPv6)
}

// result is the /ip/N checks: {"result": true}.
func (p *probe) result(path string) bool {
	var v struct{ Result any }
	return p.getJSON(path, &v) && v.Result == true
}

// internet passes when the program got an HTTP status below 400 from one
// of its targets: {"result": 200}.
func (p *probe) internet() bool {
	var v struct{ Result any }
	if !p.getJSON("/internet", &v) {
		return false
	}
	code, ok := v.Result.(float64)
	return ok && code < 400
}

func (p *probe) cache() bool {
	var set bool
	var got string
	var keys []string
	return p.getJSON("/cache/set/a/42", &set) && set &&
		p.getJSON("/cache/get/a", &got) && got == "42" &&
		p.getJSON("/cache/keys", &keys) && slices.Contains(keys, "a")
}

func (p *probe) persistentStorage() bool {
	var first, second struct{ Counter int }
	return p.getJSON("/state/increment", &first) && p.getJSON("/state/increment", &second) &&
		second.Counter >= first.Counter+1
}

func (p *probe) errorHandling() bool {
	status, body := p.get("/raise")
	return status == http.StatusInternalServerError && bytes.Contains(body, []byte("Traceback"))
}

func (p *probe) getAMessage() bool {
	var v map[string]any
	if !p.getJSON("/get_a_message", &v) {
		return false
	}
	_, ok := v["item_hash"]
	return ok
}

func truthy(v any) bool {
	switch v := v.(type) {
	case string:
		return v != ""
	case bool:
		return v
	case nil:
		return false
	}
	return true
}
