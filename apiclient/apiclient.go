// Package apiclient is a client of a node's HTTP API, as `alephvm vm`
// uses it: the operator's calls on one VM (start, stop, reboot, erase),
// the executions list and a VM's logs. How a call proves who makes it is
// the caller's choice (Auth): the scheduler's token today, an owner's
// wallet signature tomorrow.
package apiclient

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/alephvm/alephvm/message"
)

// Auth gives a request its credentials: it sets headers (or fails). body
// is what the request carries, for schemes that sign it.
type Auth func(req *http.Request, body []byte) error

// Token is the scheduler's legacy credential: the token itself, whose
// sha256 the node has as ALLOCATION_TOKEN_HASH, in X-Auth-Signature.
func Token(token string) Auth {
	return func(req *http.Request, _ []byte) error {
		req.Header.Set("X-Auth-Signature", token)
		return nil
	}
}

// Signer signs calls as a VM's owner, as the Aleph SDKs do
// (auth.OwnerSigner): the X-SignedPubKey and X-SignedOperation headers of
// a request, and the first frame of the stream_logs websocket.
type Signer interface {
	Headers(method, path string) (http.Header, error)
	AuthFrame(path string) ([]byte, error)
}

// Signed is the Auth of a VM's owner: the request's method and path
// (without its query) signed by s.
func Signed(s Signer) Auth {
	return func(req *http.Request, _ []byte) error {
		h, err := s.Headers(req.Method, req.URL.Path)
		if err != nil {
			return err
		}
		for k, v := range h {
			req.Header[k] = v
		}
		return nil
	}
}

// maxAnswer bounds what the client reads of one answer.
const maxAnswer = 16 << 20

// Client calls one node.
type Client struct {
	base  string
	auth  Auth
	owner Signer // set for an owner's client: logs go through stream_logs
	http  *http.Client
}

// New returns a client of the node at base (http://host:port). auth may
// be nil: then calls carry no credentials.
func New(base string, auth Auth) (*Client, error) {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("node URL %q: want http://host:port", base)
	}
	return &Client{base: strings.TrimSuffix(base, "/"), auth: auth, http: &http.Client{Timeout: 10 * time.Minute}}, nil
}

// NewOwner returns a client of the node at base that calls as the owner
// whose wallet s signs with.
func NewOwner(base string, s Signer) (*Client, error) {
	c, err := New(base, Signed(s))
	if err != nil {
		return nil, err
	}
	c.owner = s
	return c, nil
}

// Base is the node's URL.
func (c *Client) Base() string { return c.base }

// Error is a node's answer other than 2xx.
type Error struct {
	Status  int
	Message string // the node's error, or its answer's text
}

func (e *Error) Error() string { return fmt.Sprintf("node answered %d: %s", e.Status, e.Message) }

// The operations on one VM; each returns the node's answer, a sentence
// such as "Stopped VM with ref ...".

// Start starts an instance (the node fetches its message and disks first).
func (c *Client) Start(ctx context.Context, ref message.ItemHash) (string, error) {
	return c.machine(ctx, ref, "start")
}

// Stop stops a program or an instance; an instance's disks are kept.
func (c *Client) Stop(ctx context.Context, ref message.ItemHash) (string, error) {
	return c.machine(ctx, ref, "stop")
}

// Reboot stops an instance cleanly and starts it again.
func (c *Client) Reboot(ctx context.Context, ref message.ItemHash) (string, error) {
	return c.machine(ctx, ref, "reboot")
}

// Erase stops a VM and deletes its disks and volumes.
func (c *Client) Erase(ctx context.Context, ref message.ItemHash) (string, error) {
	return c.machine(ctx, ref, "erase")
}

// Expire stops a VM now.
func (c *Client) Expire(ctx context.Context, ref message.ItemHash) (string, error) {
	return c.machine(ctx, ref, "expire")
}

// Update makes the node read the owner's port-forwarding aggregate again.
func (c *Client) Update(ctx context.Context, ref message.ItemHash) (string, error) {
	return c.machine(ctx, ref, "update")
}

// Reinstall gives a VM a fresh root disk from its base image and starts
// it; its volumes are erased too unless keepVolumes.
func (c *Client) Reinstall(ctx context.Context, ref message.ItemHash, keepVolumes bool) (string, error) {
	op := "reinstall"
	if keepVolumes {
		op += "?erase_volumes=false"
	}
	return c.machine(ctx, ref, op)
}

func (c *Client) machine(ctx context.Context, ref message.ItemHash, op string) (string, error) {
	if _, err := message.ParseItemHash(string(ref)); err != nil {
		return "", fmt.Errorf("%s: %w", op, err)
	}
	data, err := c.do(ctx, http.MethodPost, "/control/machine/"+string(ref)+"/"+op, nil)
	return strings.TrimSpace(string(data)), err
}

// Execution is one VM of the node's executions list.
type Execution struct {
	Ref         message.ItemHash
	VMType      string // microvm (a program) or instance
	Running     bool
	VCPUs       int
	MemoryMiB   int
	IPv4Network string
	IPv4        string
	// MappedPorts are the instance's forwards, by guest port.
	MappedPorts map[int]MappedPort
	// StartedAt is when the running VM started; zero when it does not run.
	StartedAt time.Time
}

// MappedPort is the host port that forwards to a guest port, and for
// which protocols.
type MappedPort struct {
	Host     int
	TCP, UDP bool
}

// startedAtLayout is the reference's form of a start time in the
// executions list.
const startedAtLayout = "2006-01-02 15:04:05.999999-07:00"

// List returns the node's executions, sorted by ref.
func (c *Client) List(ctx context.Context) ([]Execution, error) {
	data, err := c.do(ctx, http.MethodGet, "/v2/about/executions/list", nil)
	if err != nil {
		return nil, err
	}
	var list map[message.ItemHash]struct {
		Networking struct {
			IPv4Network string `json:"ipv4_network"`
			IPv4        string `json:"ipv4_ip"`
			MappedPorts map[string]struct {
				Host int  `json:"host"`
				TCP  bool `json:"tcp"`
				UDP  bool `json:"udp"`
			} `json:"mapped_ports"`
		} `json:"networking"`
		Status struct {
			StartedAt *string `json:"started_at"`
		} `json:"status"`
		Running bool   `json:"running"`
		VMType  string `json:"vm_type"`
		VCPUs   int    `json:"vcpus"`
		Memory  int    `json:"memory"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("read the node's executions list: %w", err)
	}
	out := make([]Execution, 0, len(list))
	for ref, e := range list {
		x := Execution{Ref: ref, VMType: e.VMType, Running: e.Running, VCPUs: e.VCPUs, MemoryMiB: e.Memory,
			IPv4Network: e.Networking.IPv4Network, IPv4: e.Networking.IPv4}
		if e.Status.StartedAt != nil && e.Running {
			t, err := time.Parse(startedAtLayout, *e.Status.StartedAt)
			if err != nil {
				return nil, fmt.Errorf("read the node's executions list: %s started at %q", ref, *e.Status.StartedAt)
			}
			x.StartedAt = t
		}
		for guest, m := range e.Networking.MappedPorts {
			port, err := strconv.Atoi(guest)
			if err != nil || port < 1 || port > 65535 {
				return nil, fmt.Errorf("read the node's executions list: %s maps guest port %q", ref, guest)
			}
			if x.MappedPorts == nil {
				x.MappedPorts = map[int]MappedPort{}
			}
			x.MappedPorts[port] = MappedPort{Host: m.Host, TCP: m.TCP, UDP: m.UDP}
		}
		out = append(out, x)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, nil
}

// LogLine is one line of a VM's output. Stream is stdout or stderr (a
// program's workload), console (an instance's serial console), or system
// (the node's own lines).
type LogLine struct {
	Stream string
	Text   string
}

// maxLogLine bounds one message of the logs stream.
const maxLogLine = 1 << 20

// PastLogs returns the lines the node keeps of a VM's output.
func (c *Client) PastLogs(ctx context.Context, ref message.ItemHash) ([]LogLine, error) {
	if _, err := message.ParseItemHash(string(ref)); err != nil {
		return nil, fmt.Errorf("logs: %w", err)
	}
	data, err := c.do(ctx, http.MethodGet, "/control/machine/"+string(ref)+"/logs", nil)
	if err != nil {
		return nil, err
	}
	var lines []struct {
		File    string `json:"file"`
		Message string `json:"MESSAGE"`
	}
	if err := json.Unmarshal(data, &lines); err != nil {
		return nil, fmt.Errorf("read the node's logs: %w", err)
	}
	out := make([]LogLine, len(lines))
	for i, l := range lines {
		out[i] = LogLine{Stream: l.File, Text: l.Message}
	}
	return out, nil
}

// Logs calls fn with a VM's output, past lines first, then each new line
// until the VM stops (nil), fn fails or ctx ends (nil). An owner's client
// reads the stream_logs websocket, whose first frame carries its
// signature; the operator's reads logs, with its credentials in the
// upgrade request.
func (c *Client) Logs(ctx context.Context, ref message.ItemHash, fn func(LogLine) error) error {
	if _, err := message.ParseItemHash(string(ref)); err != nil {
		return fmt.Errorf("logs: %w", err)
	}
	conn, err := c.dialLogs(ctx, ref)
	if err != nil {
		return fmt.Errorf("follow logs: %w", err)
	}
	defer conn.CloseNow()
	conn.SetReadLimit(maxLogLine)
	for {
		var m struct {
			Type    string `json:"type"`
			Message string `json:"message"`
			Status  string `json:"status"`
			Reason  string `json:"reason"`
		}
		if err := wsjson.Read(ctx, conn, &m); err != nil {
			if websocket.CloseStatus(err) == websocket.StatusNormalClosure || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("follow logs: %w", err)
		}
		switch m.Status {
		case "connected":
			continue
		case "failed":
			return fmt.Errorf("follow logs: the node refused: %s", m.Reason)
		}
		if err := fn(LogLine{Stream: m.Type, Text: m.Message}); err != nil {
			return err
		}
	}
}

func (c *Client) dialLogs(ctx context.Context, ref message.ItemHash) (*websocket.Conn, error) {
	ws := "ws" + strings.TrimPrefix(c.base, "http")
	if c.owner != nil {
		path := "/control/machine/" + string(ref) + "/stream_logs"
		conn, resp, err := websocket.Dial(ctx, ws+path, nil)
		if err != nil {
			return nil, dialError(resp, err)
		}
		frame, err := c.owner.AuthFrame(path)
		if err == nil {
			err = conn.Write(ctx, websocket.MessageText, frame)
		}
		if err != nil {
			conn.CloseNow()
			return nil, err
		}
		return conn, nil
	}
	u := ws + "/control/machine/" + string(ref) + "/logs"
	header, err := c.credentials(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	conn, resp, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPHeader: header})
	if err != nil {
		return nil, dialError(resp, err)
	}
	return conn, nil
}

// dialError is the node's refusal of a websocket, when it answered one.
func dialError(resp *http.Response, err error) error {
	if resp != nil && resp.StatusCode/100 != 2 && resp.StatusCode != http.StatusSwitchingProtocols {
		return answerError(resp.StatusCode, readAnswer(resp.Body))
	}
	return err
}

// credentials returns the headers auth gives a request.
func (c *Client) credentials(ctx context.Context, method, u string, body []byte) (http.Header, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if c.auth != nil {
		if err := c.auth(req, body); err != nil {
			return nil, fmt.Errorf("credentials: %w", err)
		}
	}
	return req.Header, nil
}

// do sends a request and returns the body of a 2xx answer, or an *Error
// holding the node's message.
func (c *Client) do(ctx context.Context, method, path string, body []byte) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if c.auth != nil {
		if err := c.auth(req, body); err != nil {
			return nil, fmt.Errorf("credentials: %w", err)
		}
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach the node at %s: %w (is alephvm serve running?)", c.base, err)
	}
	defer resp.Body.Close()
	data := readAnswer(resp.Body)
	if resp.StatusCode/100 != 2 {
		return nil, answerError(resp.StatusCode, data)
	}
	if len(data) > maxAnswer {
		return nil, fmt.Errorf("the node's answer is larger than %d bytes", maxAnswer)
	}
	return data, nil
}

// readAnswer reads at most maxAnswer+1 bytes, so that a larger answer is
// seen as such.
func readAnswer(r io.Reader) []byte {
	data, _ := io.ReadAll(io.LimitReader(r, maxAnswer+1))
	return data
}

func answerError(status int, data []byte) error {
	var e struct {
		Error string `json:"error"`
	}
	msg := strings.TrimSpace(string(data))
	if json.Unmarshal(data, &e) == nil && e.Error != "" {
		msg = e.Error
	}
	const maxShown = 1000
	if len(msg) > maxShown {
		msg = strings.ToValidUTF8(msg[:maxShown], "") + "…"
	}
	return &Error{Status: status, Message: msg}
}

// Layer is a layer the node made of a running instance's root disk and
// stored: its ref, the parent it names (aleph://<item hash>), its sha256
// and size, and how the copy was held still (frozen or crash).
type Layer struct {
	Ref         message.ItemHash `json:"ref"`
	Parent      string           `json:"parent"`
	SHA256      string           `json:"sha256"`
	Size        int64            `json:"size"`
	Consistency string           `json:"consistency"`
}

// MakeLayer asks the node for a layer of running instance ref.
func (c *Client) MakeLayer(ctx context.Context, ref message.ItemHash) (Layer, error) {
	if _, err := message.ParseItemHash(string(ref)); err != nil {
		return Layer{}, fmt.Errorf("layer: %w", err)
	}
	data, err := c.do(ctx, http.MethodPost, "/control/machine/"+string(ref)+"/layer", nil)
	if err != nil {
		return Layer{}, err
	}
	var l Layer
	if err := json.Unmarshal(data, &l); err != nil {
		return Layer{}, fmt.Errorf("the node's answer: %w", err)
	}
	return l, nil
}
