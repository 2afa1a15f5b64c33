package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"time"
)

// GuestAgentPort is the virtio-serial port name qemu-guest-agent opens in
// the guest (its udev rule starts the agent when the port appears).
const GuestAgentPort = "org.qemu.guest_agent.0"

// GuestAgent talks to a guest's qemu-guest-agent over the VM's agent
// channel: JSON commands and answers, one per line. The channel is one
// byte stream whatever connects to it, so a GuestAgent resynchronizes
// first (guest-sync-delimited): an answer left over from an earlier
// client, or a command the agent half-read, is skipped.
type GuestAgent struct {
	conn net.Conn
	r    *bufio.Reader
	id   int64
}

// ErrNoGuestAgent is returned when nothing answers on the agent channel:
// the VM has none, or the guest runs no agent (yet).
var ErrNoGuestAgent = errors.New("the guest agent does not answer")

// GuestAgentSocket returns the host end of the VM's guest agent channel.
func (vm *VM) GuestAgentSocket() string { return filepath.Join(vm.dir, GuestAgentSocket) }

// DialGuestAgent connects to the agent behind socket and checks that it
// answers within timeout.
func DialGuestAgent(ctx context.Context, socket string, timeout time.Duration) (*GuestAgent, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoGuestAgent, err)
	}
	ga := &GuestAgent{conn: conn, r: bufio.NewReader(conn), id: time.Now().UnixNano() & (1<<52 - 1)}
	if err := ga.sync(ctx, timeout); err != nil {
		conn.Close()
		return nil, err
	}
	return ga, nil
}

// Close closes the connection.
func (ga *GuestAgent) Close() error { return ga.conn.Close() }

// sync sends guest-sync-delimited and skips what comes before its answer:
// the agent writes a 0xff byte before that answer, which starts it.
func (ga *GuestAgent) sync(ctx context.Context, timeout time.Duration) error {
	ga.id++
	id := ga.id
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = ga.conn.SetDeadline(deadline)
	defer ga.conn.SetDeadline(time.Time{})
	// A 0xff first makes an agent that was in the middle of a command
	// drop it.
	if _, err := ga.conn.Write([]byte{0xff}); err != nil {
		return fmt.Errorf("%w: %v", ErrNoGuestAgent, err)
	}
	if err := ga.send("guest-sync-delimited", map[string]int64{"id": id}); err != nil {
		return fmt.Errorf("%w: %v", ErrNoGuestAgent, err)
	}
	for {
		if _, err := ga.r.ReadBytes(0xff); err != nil {
			return fmt.Errorf("%w: %v", ErrNoGuestAgent, err)
		}
		line, err := ga.r.ReadBytes('\n')
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoGuestAgent, err)
		}
		var got struct {
			Return int64 `json:"return"`
		}
		if json.Unmarshal(line, &got) == nil && got.Return == id {
			return nil
		}
	}
}

func (ga *GuestAgent) send(command string, args any) error {
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
	}{command, args}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	_, err = ga.conn.Write(append(b, '\n'))
	return err
}

// Execute runs an agent command within timeout and decodes its return
// value into out (when not nil).
func (ga *GuestAgent) Execute(ctx context.Context, command string, timeout time.Duration, out any) error {
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = ga.conn.SetDeadline(deadline)
	defer ga.conn.SetDeadline(time.Time{})
	if err := ga.send(command, nil); err != nil {
		return fmt.Errorf("guest agent %s: %w", command, err)
	}
	for {
		line, err := ga.r.ReadBytes('\n')
		if err != nil {
			return fmt.Errorf("guest agent %s: %w", command, err)
		}
		var reply struct {
			Return json.RawMessage `json:"return"`
			Error  *QMPError       `json:"error"`
		}
		if json.Unmarshal(line, &reply) != nil {
			continue // not an answer: a stray byte or line
		}
		if reply.Error != nil {
			return fmt.Errorf("guest agent %s: %w", command, reply.Error)
		}
		if reply.Return == nil {
			continue
		}
		if out != nil {
			if err := json.Unmarshal(reply.Return, out); err != nil {
				return fmt.Errorf("guest agent %s: decode answer: %w", command, err)
			}
		}
		return nil
	}
}

// Freeze freezes the guest's filesystems (their data and journals written
// out, then no writes until Thaw) and returns how many it froze.
func (ga *GuestAgent) Freeze(ctx context.Context, timeout time.Duration) (int, error) {
	var n int
	err := ga.Execute(ctx, "guest-fsfreeze-freeze", timeout, &n)
	return n, err
}

// Thaw thaws the guest's filesystems and returns how many it thawed.
func (ga *GuestAgent) Thaw(ctx context.Context, timeout time.Duration) (int, error) {
	var n int
	err := ga.Execute(ctx, "guest-fsfreeze-thaw", timeout, &n)
	return n, err
}

// Pause stops the VM's vCPUs; QEMU first finishes and flushes the
// guest's disk I/O, so its disk files then hold one point in time.
func (vm *VM) Pause(ctx context.Context) error { return vm.qmp.Execute(ctx, "stop", nil, nil) }

// Resume runs the VM's vCPUs again after Pause.
func (vm *VM) Resume(ctx context.Context) error { return vm.qmp.Execute(ctx, "cont", nil, nil) }
