package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/guest"
	"github.com/alephvm/alephvm/message"
)

func newRunCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "run MESSAGE|HASH",
		Short: "Run one program in the foreground: boot it, print its URL, follow its output",
		Long: `Run a node in the foreground (as alephvm serve does) and boot one program on
it: MESSAGE is a PROGRAM message file (validated and stored first), HASH the
hash of a stored one. Its URL is printed once it answers, then its output
(stdout and stderr) until Ctrl-C, which stops the node and the program.
Meant for a developer trying a program; needs root, as serve does.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return serve(cmd.Context(), a, false, func(ctx context.Context, n *node, base string) error {
				ref := message.ItemHash(args[0])
				if raw, err := os.ReadFile(args[0]); err == nil {
					msg, err := n.store.AddMessage(ctx, raw)
					if err != nil {
						return err
					}
					ref = msg.ItemHash
				} else if _, err := message.ParseItemHash(args[0]); err != nil {
					return fmt.Errorf("%q is neither a message file nor an item hash", args[0])
				}
				lease, err := n.programs.Acquire(ctx, ref)
				if err != nil {
					return fmt.Errorf("boot %s: %w", ref, err)
				}
				lease.Release()
				fmt.Fprintf(cmd.OutOrStdout(), "%s/vm/%s/\n", base, ref)
				if buf := n.logs.Get(ref); buf != nil {
					go buf.Follow(ctx, func(l guest.LogLine) error {
						_, err := fmt.Fprintf(cmd.OutOrStdout(), "[%s] %s\n", l.Stream, l.Text)
						return err
					})
				}
				return nil
			})
		},
	}
	a.bindCommandSettings(cmd)
	return cmd
}
