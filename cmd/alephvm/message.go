package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/store"
)

func newMessageCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "message",
		Short: "Work with Aleph messages",
	}
	var regenerate bool
	validate := &cobra.Command{
		Use:   "validate FILE...",
		Short: "Check Aleph messages against the aleph-message 1.1.1 schema",
		Long: `Check each FILE (a JSON message; - reads standard input) against the schema of
aleph-message 1.1.1 and print one line per file: "FILE: ok TYPE HASH" or
"FILE: invalid: PATH: PROBLEM; ...". Exits 0 when every file is valid, 1
otherwise.

Without --regenerate a message is checked as received: for an inline message
item_hash must be the sha256 of item_content. With --regenerate item_content is
first set to the compact JSON of content and item_hash to its sha256, as the
reference library's own tests do; use it for hand-written messages.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, files []string) error {
			allValid := true
			for _, file := range files {
				line, ok := validateFile(file, regenerate)
				allValid = allValid && ok
				fmt.Fprintf(cmd.OutOrStdout(), "%s: %s\n", file, line)
			}
			if !allValid {
				return exitError{code: 1}
			}
			return nil
		},
	}
	validate.Flags().BoolVar(&regenerate, "regenerate", false, "set item_content and item_hash from content before checking")
	add := &cobra.Command{
		Use:   "add FILE",
		Short: "Validate a message and keep it in the node's store",
		Long: `Validate FILE (a JSON message; - reads standard input) as "message validate"
does, without --regenerate, and keep it in the node's database, marked local.
Its signature is not checked. Prints "TYPE HASH". A PROGRAM or INSTANCE
message kept this way can be run by its hash; a STORE message makes its file
fetchable by "store get".`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			data, err := readMessageFile(args[0])
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				msg, err := s.AddMessage(cmd.Context(), data)
				if err != nil {
					return fmt.Errorf("%s: %w", args[0], err)
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s %s\n", msg.Type, msg.ItemHash)
				return err
			})
		},
	}
	get := &cobra.Command{
		Use:   "get HASH",
		Short: "Print a message as received",
		Long: `Print the message whose item hash is HASH, as it was received: from the
node's database, else from API_SERVER when it is set (the message is then
validated and kept).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				_, raw, err := s.Message(cmd.Context(), message.ItemHash(args[0]))
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s\n", raw)
				return err
			})
		},
	}
	for _, c := range []*cobra.Command{add, get} {
		a.bindCommandSettings(c)
	}
	cmd.AddCommand(validate, add, get)
	return cmd
}

// validateFile checks one message file and describes the result.
func validateFile(file string, regenerate bool) (string, bool) {
	data, err := readMessageFile(file)
	if err != nil {
		return "invalid: " + err.Error(), false
	}
	if regenerate {
		if data, err = message.Regenerate(data); err != nil {
			return "invalid: " + err.Error(), false
		}
	}
	msg, err := message.Parse(data)
	if err != nil {
		return "invalid: " + err.Error(), false
	}
	return fmt.Sprintf("ok %s %s", msg.Type, msg.ItemHash), true
}

// readMessageFile reads at most one byte more than a message may hold, so
// that a huge file is refused without being read whole.
func readMessageFile(file string) ([]byte, error) {
	var r io.Reader = os.Stdin
	if file != "-" {
		f, err := os.Open(file)
		if err != nil {
			return nil, errors.Unwrap(err) // the path is already on the line
		}
		defer f.Close()
		r = f
	}
	data, err := io.ReadAll(io.LimitReader(r, message.MaxMessageSize+1))
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	return data, nil
}
