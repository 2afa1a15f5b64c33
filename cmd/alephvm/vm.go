package main

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

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

// nodeClient is a client of that node, with the scheduler's token when one
// is set.
func (a *app) nodeClient() (*apiclient.Client, error) {
	var auth apiclient.Auth
	if a.cfg.AllocationToken != "" {
		auth = apiclient.Token(a.cfg.AllocationToken)
	}
	return apiclient.New(a.nodeURL(), auth)
}

func newVMCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Control the VMs of a running node (a client of its API)",
		Long: `Control the VMs of the node at SUPERVISOR_HOST:SUPERVISOR_PORT. start, stop,
reboot and erase are scheduler calls: the node accepts them with the token
whose sha256 it has as ALLOCATION_TOKEN_HASH; give the token itself as
ALEPH_VM_ALLOCATION_TOKEN or --allocation-token.`,
	}
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
	cmd.AddCommand(
		action("start", "Start an instance (the node fetches its message and disks first)", (*apiclient.Client).Start),
		action("stop", "Stop a VM; an instance's disks are kept", (*apiclient.Client).Stop),
		action("reboot", "Stop an instance cleanly and start it again", (*apiclient.Client).Reboot),
		action("erase", "Stop an instance and delete its disks", (*apiclient.Client).Erase),
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
			fmt.Fprintln(w, "HASH\tTYPE\tSTATE\tVCPUS\tMEMORY\tIPV4\tPORTS")
			for _, e := range list {
				state := "stopped"
				if e.Running {
					state = "running"
				}
				var ports []string
				for guestPort, m := range e.MappedPorts {
					ports = append(ports, fmt.Sprintf("%d->%d", m.Host, guestPort))
				}
				sort.Strings(ports)
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%dMiB\t%s\t%s\n", e.Ref, e.VMType, state, e.VCPUs, e.MemoryMiB, e.IPv4, strings.Join(ports, ","))
			}
			return w.Flush()
		},
	}
}

func newVMLogsCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "logs HASH",
		Short: "Print a VM's output, past lines first, and follow it until it stops (Ctrl-C to leave)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.nodeClient()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			return c.Logs(cmd.Context(), message.ItemHash(args[0]), func(l apiclient.LogLine) error {
				prefix := ""
				if l.Stream != "stdout" && l.Stream != "console" {
					prefix = "[" + l.Stream + "] "
				}
				_, err := fmt.Fprintln(out, prefix+l.Text)
				return err
			})
		},
	}
}
