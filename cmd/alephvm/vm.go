package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"
	"github.com/spf13/cobra"
)

// nodeClient calls a node's HTTP API.
type nodeClient struct {
	base  string
	token string
	http  *http.Client
}

func (a *app) nodeClient() nodeClient {
	host := a.cfg.SupervisorHost
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return nodeClient{
		base:  "http://" + net.JoinHostPort(host, strconv.Itoa(a.cfg.SupervisorPort)),
		token: a.cfg.AllocationToken,
		http:  &http.Client{Timeout: 10 * time.Minute},
	}
}

// do sends a request and returns the body of a 2xx answer, or an error
// holding the node's message.
func (c nodeClient) do(ctx context.Context, method, path string, body io.Reader) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if c.token != "" {
		req.Header.Set("X-Auth-Signature", c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach the node at %s: %w (is alephvm serve running?)", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return nil, fmt.Errorf("node answered %d: %s", resp.StatusCode, e.Error)
		}
		return nil, fmt.Errorf("node answered %d: %s", resp.StatusCode, strings.TrimSpace(string(data)))
	}
	return data, nil
}

func newVMCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Control the VMs of a running node (a client of its API)",
		Long: `Control the VMs of the node at SUPERVISOR_HOST:SUPERVISOR_PORT. start, stop,
reboot, erase and logs are operator calls: the node accepts them with the token
whose sha256 it has as ALLOCATION_TOKEN_HASH; give the token itself as
ALEPH_VM_ALLOCATION_TOKEN or --allocation-token.`,
	}
	action := func(use, short, path string) *cobra.Command {
		return &cobra.Command{
			Use:   use + " HASH",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				out, err := a.nodeClient().do(cmd.Context(), "POST", "/control/machine/"+args[0]+"/"+path, nil)
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), strings.TrimSpace(string(out)))
				return nil
			},
		}
	}
	cmd.AddCommand(
		action("start", "Start an instance (the node fetches its message and disks first)", "start"),
		action("stop", "Stop a VM; an instance's disks are kept", "stop"),
		action("reboot", "Stop an instance cleanly and start it again", "reboot"),
		action("erase", "Stop an instance and delete its disks", "erase"),
		newVMListCmd(a),
		newVMLogsCmd(a),
	)
	for _, c := range cmd.Commands() {
		a.bindCommandSettings(c)
	}
	return cmd
}

func newVMListCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the node's executions with their addresses and forwarded ports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			data, err := a.nodeClient().do(cmd.Context(), "GET", "/v2/about/executions/list", nil)
			if err != nil {
				return err
			}
			var list map[string]struct {
				Networking struct {
					IPv4        string `json:"ipv4_ip"`
					MappedPorts map[string]struct {
						Host int  `json:"host"`
						TCP  bool `json:"tcp"`
						UDP  bool `json:"udp"`
					} `json:"mapped_ports"`
				} `json:"networking"`
				Running bool   `json:"running"`
				VMType  string `json:"vm_type"`
				VCPUs   int    `json:"vcpus"`
				Memory  int    `json:"memory"`
			}
			if err := json.Unmarshal(data, &list); err != nil {
				return fmt.Errorf("read the node's answer: %w", err)
			}
			refs := make([]string, 0, len(list))
			for ref := range list {
				refs = append(refs, ref)
			}
			sort.Strings(refs)
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "HASH\tTYPE\tSTATE\tVCPUS\tMEMORY\tIPV4\tPORTS")
			for _, ref := range refs {
				e := list[ref]
				state := "stopped"
				if e.Running {
					state = "running"
				}
				var ports []string
				for guestPort, m := range e.Networking.MappedPorts {
					ports = append(ports, fmt.Sprintf("%d->%s", m.Host, guestPort))
				}
				sort.Strings(ports)
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%dMiB\t%s\t%s\n", ref, e.VMType, state, e.VCPUs, e.Memory, e.Networking.IPv4, strings.Join(ports, ","))
			}
			return w.Flush()
		},
	}
}

func newVMLogsCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "logs HASH",
		Short: "Print a VM's output, past lines first, and follow it until it stops (Ctrl-C to leave); needs the allocation token",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return followLogs(cmd.Context(), a.nodeClient(), args[0], cmd.OutOrStdout())
		},
	}
}

// followLogs prints a VM's output from the node's logs websocket.
func followLogs(ctx context.Context, c nodeClient, ref string, out io.Writer) error {
	u := "ws" + strings.TrimPrefix(c.base, "http") + "/control/machine/" + ref + "/logs"
	h := http.Header{}
	if c.token != "" {
		h.Set("X-Auth-Signature", c.token)
	}
	conn, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPHeader: h})
	if err != nil {
		return fmt.Errorf("follow logs: %w", err)
	}
	defer conn.CloseNow()
	conn.SetReadLimit(1 << 20)
	for {
		var m struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		}
		if err := wsjson.Read(ctx, conn, &m); err != nil {
			if websocket.CloseStatus(err) == websocket.StatusNormalClosure || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("follow logs: %w", err)
		}
		prefix := ""
		if m.Type != "stdout" && m.Type != "console" {
			prefix = "[" + m.Type + "] "
		}
		fmt.Fprintln(out, prefix+m.Message)
	}
}
