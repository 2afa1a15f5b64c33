package main

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/apiclient"
	"github.com/alephvm/alephvm/message"
)

// nodeURL is the base URL of the node this machine runs, as its
// settings say.
func (a *app) nodeURL() string {
	host := a.cfg.SupervisorHost
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, strconv.Itoa(a.cfg.SupervisorPort))
}

// nodeClient is a client of the node at --node (else this machine's):
// as the VM owner whose wallet --key holds, else as the operator with the
// allocation token when one is set.
func (a *app) nodeClient() (*apiclient.Client, error) {
	base := strings.TrimRight(a.vmCreds.node, "/")
	if base == "" {
		base = a.nodeURL()
	}
	if a.vmCreds.keyFile != "" {
		signer, err := walletSigner(a.vmCreds.keyFile, base)
		if err != nil {
			return nil, err
		}
		return apiclient.NewOwner(base, signer)
	}
	var auth apiclient.Auth
	if a.cfg.AllocationToken != "" {
		auth = apiclient.Token(a.cfg.AllocationToken)
	}
	return apiclient.New(base, auth)
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
	type operation func(*apiclient.Client, context.Context, message.ItemHash) (string, error)
	action := func(use, short string, op operation) *cobra.Command {
		return &cobra.Command{
			Use:   use + " HASH",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := a.nodeClient()
				if err != nil {
					return err
				}
				out, err := op(c, cmd.Context(), message.ItemHash(args[0]))
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), out)
				return nil
			},
		}
	}
	var keepVolumes bool
	reinstall := action("reinstall", "Give a VM a fresh root disk from its base image and start it; its volumes are erased unless --keep-volumes",
		func(c *apiclient.Client, ctx context.Context, ref message.ItemHash) (string, error) {
			return c.Reinstall(ctx, ref, keepVolumes)
		})
	reinstall.Flags().BoolVar(&keepVolumes, "keep-volumes", false, "keep the VM's data volumes")
	cmd.AddCommand(
		action("start", "Start a VM (the node fetches its message and disks first)", (*apiclient.Client).Start),
		action("stop", "Stop a VM; an instance's disks are kept", (*apiclient.Client).Stop),
		action("reboot", "Stop a VM cleanly and start it again", (*apiclient.Client).Reboot),
		action("erase", "Stop a VM and delete its disks and volumes", (*apiclient.Client).Erase),
		action("expire", "Stop a VM now", (*apiclient.Client).Expire),
		action("update", "Make the node read the owner's port-forwarding aggregate again", (*apiclient.Client).Update),
		reinstall,
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
			c, err := a.nodeClient()
			if err != nil {
				return err
			}
			list, err := c.List(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "HASH\tTYPE\tSTATE\tVCPUS\tMEMORY\tIPV4\tUPTIME\tPORTS")
			for _, e := range list {
				state, up := "stopped", "-"
				if e.Running {
					state = "running"
					if !e.StartedAt.IsZero() {
						up = uptime(time.Since(e.StartedAt))
					}
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%dMiB\t%s\t%s\t%s\n", e.Ref, e.VMType, state, e.VCPUs, e.MemoryMiB, e.IPv4, up, listPorts(e.MappedPorts))
			}
			return w.Flush()
		},
	}
}

// listPorts shows an instance's forwards as host->guest/proto, by guest
// port.
func listPorts(mapped map[int]apiclient.MappedPort) string {
	guests := make([]int, 0, len(mapped))
	for g := range mapped {
		guests = append(guests, g)
	}
	sort.Ints(guests)
	var ports []string
	for _, g := range guests {
		m := mapped[g]
		if m.TCP {
			ports = append(ports, fmt.Sprintf("%d->%d/tcp", m.Host, g))
		}
		if m.UDP {
			ports = append(ports, fmt.Sprintf("%d->%d/udp", m.Host, g))
		}
	}
	if len(ports) == 0 {
		return "-"
	}
	return strings.Join(ports, ",")
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
			out := cmd.OutOrStdout()
			print := func(l apiclient.LogLine) error {
				prefix := ""
				if l.Stream != "stdout" && l.Stream != "console" {
					prefix = "[" + l.Stream + "] "
				}
				_, err := fmt.Fprintln(out, prefix+l.Text)
				return err
			}
			ref := message.ItemHash(args[0])
			if follow {
				return c.Logs(cmd.Context(), ref, print)
			}
			lines, err := c.PastLogs(cmd.Context(), ref)
			if err != nil {
				return err
			}
			for _, l := range lines {
				if err := print(l); err != nil {
					return err
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "follow the output until the VM stops")
	return cmd
}
