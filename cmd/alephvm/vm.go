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

	"github.com/alephvm/alephvm/auth"
)

// nodeClient calls a node's HTTP API.
type nodeClient struct {
	base   string
	token  string
	signer *auth.OwnerSigner // a VM owner's wallet (--key), else the token
	http   *http.Client
}

func (a *app) nodeClient() (nodeClient, error) {
	base := strings.TrimRight(a.vmCreds.node, "/")
	if base == "" {
		host := a.cfg.SupervisorHost
		if host == "" || host == "0.0.0.0" || host == "::" {
			host = "127.0.0.1"
		}
		base = "http://" + net.JoinHostPort(host, strconv.Itoa(a.cfg.SupervisorPort))
	}
	c := nodeClient{base: base, token: a.cfg.AllocationToken, http: &http.Client{Timeout: 10 * time.Minute}}
	if a.vmCreds.keyFile != "" {
		signer, err := walletSigner(a.vmCreds.keyFile, base)
		if err != nil {
			return nodeClient{}, err
		}
		c.signer = signer
	}
	return c, nil
}

// do sends a request and returns the body of a 2xx answer, or an error
// holding the node's message.
func (c nodeClient) do(ctx context.Context, method, path string, body io.Reader) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if err := c.sign(req); err != nil {
		return nil, err
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
		Long: `Control the VMs of the node at --node (default: SUPERVISOR_HOST:SUPERVISOR_PORT).

As a VM's owner, give --key FILE, a file holding the Ethereum private key
(hex) of the wallet the VM's message names (or one its security aggregate
grants): the calls are signed as the Aleph SDKs sign them, for the host name
of the node's URL, which must be the node's DOMAIN_NAME.

As the node's operator, give the allocation token whose sha256 the node has
as ALLOCATION_TOKEN_HASH, as ALEPH_VM_ALLOCATION_TOKEN or --allocation-token:
it acts on every VM.`,
	}
	cmd.PersistentFlags().StringVar(&a.vmCreds.keyFile, "key", "", "file holding the Ethereum private key (hex) of the VM owner's wallet: sign as the owner")
	cmd.PersistentFlags().StringVar(&a.vmCreds.node, "node", "", "URL of the node (default: http://SUPERVISOR_HOST:SUPERVISOR_PORT)")
	action := func(use, short, path string) *cobra.Command {
		return &cobra.Command{
			Use:   use + " HASH",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return a.machineCall(cmd, args[0], path, "")
			},
		}
	}
	var keepVolumes bool
	reinstall := &cobra.Command{
		Use:   "reinstall HASH",
		Short: "Give a VM a fresh root disk from its base image and start it; its volumes are erased unless --keep-volumes",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			query := ""
			if keepVolumes {
				query = "erase_volumes=false"
			}
			return a.machineCall(cmd, args[0], "reinstall", query)
		},
	}
	reinstall.Flags().BoolVar(&keepVolumes, "keep-volumes", false, "keep the VM's data volumes")
	cmd.AddCommand(
		action("start", "Start a VM (the node fetches its message and disks first)", "start"),
		action("stop", "Stop a VM; an instance's disks are kept", "stop"),
		action("reboot", "Stop a VM cleanly and start it again", "reboot"),
		action("erase", "Stop a VM and delete its disks and volumes", "erase"),
		action("expire", "Stop a VM now", "expire"),
		action("update", "Make the node read the owner's port-forwarding aggregate again", "update"),
		reinstall,
		newVMListCmd(a),
		newVMLogsCmd(a),
	)
	for _, c := range cmd.Commands() {
		a.bindCommandSettings(c)
	}
	return cmd
}

// machineCall posts to an operator route of VM ref and prints the answer.
func (a *app) machineCall(cmd *cobra.Command, ref, op, query string) error {
	c, err := a.nodeClient()
	if err != nil {
		return err
	}
	path := "/control/machine/" + ref + "/" + op
	if query != "" {
		path += "?" + query
	}
	out, err := c.do(cmd.Context(), "POST", path, nil)
	if err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), strings.TrimSpace(string(out)))
	return nil
}

func newVMListCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the node's executions with their addresses and forwarded ports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := a.nodeClient()
			if err != nil {
				return err
			}
			data, err := c.do(cmd.Context(), "GET", "/v2/about/executions/list", nil)
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
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs HASH",
		Short: "Print a VM's past output; with -f, follow it until it stops (Ctrl-C to leave)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.nodeClient()
			if err != nil {
				return err
			}
			if follow {
				return followLogs(cmd.Context(), c, args[0], cmd.OutOrStdout())
			}
			return pastLogs(cmd.Context(), c, args[0], cmd.OutOrStdout())
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "follow the output until the VM stops")
	return cmd
}

// pastLogs prints the lines the node keeps of a VM's output.
func pastLogs(ctx context.Context, c nodeClient, ref string, out io.Writer) error {
	data, err := c.do(ctx, "GET", "/control/machine/"+ref+"/logs", nil)
	if err != nil {
		return err
	}
	var lines []struct {
		File    string `json:"file"`
		Message string `json:"MESSAGE"`
	}
	if err := json.Unmarshal(data, &lines); err != nil {
		return fmt.Errorf("read the node's answer: %w", err)
	}
	for _, l := range lines {
		prefix := ""
		if l.File != "stdout" {
			prefix = "[" + l.File + "] "
		}
		fmt.Fprintln(out, prefix+l.Message)
	}
	return nil
}

// followLogs prints a VM's output from the node's logs websocket.
func followLogs(ctx context.Context, c nodeClient, ref string, out io.Writer) error {
	conn, err := c.dialLogs(ctx, ref)
	if err != nil {
		return fmt.Errorf("follow logs: %w", err)
	}
	defer conn.CloseNow()
	conn.SetReadLimit(1 << 20)
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
		prefix := ""
		if m.Type != "stdout" && m.Type != "console" {
			prefix = "[" + m.Type + "] "
		}
		fmt.Fprintln(out, prefix+m.Message)
	}
}
