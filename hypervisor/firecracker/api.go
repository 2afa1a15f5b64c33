package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
)

// Client talks to one Firecracker process over its API socket. It covers
// what the config file cannot do once the VM runs; the VM is configured and
// booted by the config file alone (Firecracker boots as soon as it has
// read it), so there is no InstanceStart here.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the API socket at path.
func NewClient(socket string) *Client {
	return &Client{
		socket: socket,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
			// Firecracker serves one request at a time; an idle
			// connection kept open holds nothing up.
			MaxConnsPerHost: 1,
		}},
	}
}

// InstanceInfo is what Firecracker says of itself (GET /).
type InstanceInfo struct {
	ID         string `json:"id"`
	State      string `json:"state"` // "Not started", "Running" or "Paused"
	VMMVersion string `json:"vmm_version"`
	AppName    string `json:"app_name"`
}

// The states of InstanceInfo.
const (
	StateRunning = "Running"
	StatePaused  = "Paused"
)

// APIError is an error answer of the API.
type APIError struct {
	Method, Path string
	Status       int
	Fault        string // Firecracker's fault_message
}

func (e *APIError) Error() string {
	return fmt.Sprintf("firecracker API %s %s: %d %s", e.Method, e.Path, e.Status, e.Fault)
}

// Describe returns the instance's id, state and version.
func (c *Client) Describe(ctx context.Context) (InstanceInfo, error) {
	var info InstanceInfo
	err := c.do(ctx, http.MethodGet, "/", nil, &info)
	return info, err
}

// SendCtrlAltDel presses ctrl-alt-del on the guest's keyboard controller:
// a Linux guest reboots, which ends Firecracker.
func (c *Client) SendCtrlAltDel(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "/actions", map[string]string{"action_type": "SendCtrlAltDel"}, nil)
}

// Pause stops the guest's vCPUs; its memory and devices stay as they are.
func (c *Client) Pause(ctx context.Context) error {
	return c.do(ctx, http.MethodPatch, "/vm", map[string]string{"state": "Paused"}, nil)
}

// Resume restarts the vCPUs of a paused guest.
func (c *Client) Resume(ctx context.Context) error {
	return c.do(ctx, http.MethodPatch, "/vm", map[string]string{"state": "Resumed"}, nil)
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker API %s %s on %s: %w", method, path, c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("firecracker API %s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var fault struct {
			Message string `json:"fault_message"`
		}
		if json.Unmarshal(data, &fault) != nil || fault.Message == "" {
			fault.Message = strings.TrimSpace(string(data))
		}
		return &APIError{Method: method, Path: path, Status: resp.StatusCode, Fault: fault.Message}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("firecracker API %s %s: %w", method, path, err)
		}
	}
	return nil
}

// Close drops the client's idle connection.
func (c *Client) Close() { c.http.CloseIdleConnections() }
