package main

import (
	"fmt"
	"slices"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/config"
)

func newConfigCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Show the node's settings",
	}
	show := &cobra.Command{
		Use:   "show",
		Short: "Print the effective settings and where each value came from",
		Long: `Print every setting's effective value, as an environment variable assignment,
and its source: default, file, env or flag. The flags below override the
environment, exactly as they do for "alephvm serve".`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			if a.cfg.File != "" {
				fmt.Fprintf(w, "# config file: %s\n", a.cfg.File)
			}
			for _, s := range config.Settings() {
				fmt.Fprintf(w, "%s=%s\t# %s\n", s.Env, s.Value(a.cfg.Config), a.cfg.Sources[s.Key])
			}
			return w.Flush()
		},
	}
	a.bindCommandSettings(show)
	doc := &cobra.Command{
		Use:   "doc",
		Short: "Print the reference of every setting as a Markdown table",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprint(cmd.OutOrStdout(), config.Markdown())
			return err
		},
	}
	example := &cobra.Command{
		Use:   "example",
		Short: "Print a config file listing every setting, commented out, with its default and meaning",
		Long: `Print a YAML config file in which every setting appears with its help and
its default value, commented out: the file the Debian package installs as
` + config.DefaultFile + `. It shows the defaults, whatever the environment
and the current config file say.`,
		Args: cobra.NoArgs,
		// The defaults do not depend on the settings in force: an invalid
		// setting must not stop the file from being printed.
		PersistentPreRunE: func(*cobra.Command, []string) error { return nil },
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprint(cmd.OutOrStdout(), config.Example())
			return err
		},
	}
	cmd.AddCommand(show, doc, example)
	return cmd
}

// bindCommandSettings gives cmd a flag for every setting that is not
// already global. The command's own persistent pre-run replaces the root's
// so that the configuration is loaded with these flags too.
func (a *app) bindCommandSettings(cmd *cobra.Command) {
	var keys []string
	for _, s := range config.Settings() {
		if !slices.Contains(globalSettings, s.Key) {
			keys = append(keys, s.Key)
		}
	}
	flags := config.BindFlags(cmd.Flags(), keys...)
	cmd.PersistentPreRunE = func(*cobra.Command, []string) error {
		a.cmdFlags = flags
		return a.load()
	}
}
