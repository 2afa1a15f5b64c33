package main

import (
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/internal/logging"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

// app carries what every command shares: its streams, its environment and,
// once loaded, the configuration and the logger.
type app struct {
	stdout, stderr io.Writer
	environ        []string

	configFile  string
	globalFlags *config.Flags
	cmdFlags    *config.Flags // settings bound on the command being run, if any
	vmCreds     vmCredentials // alephvm vm: --key and --node
	cfg         *config.Loaded
	log         *slog.Logger
}

// globalSettings have flags on every command.
var globalSettings = []string{"LOG_LEVEL", "LOG_FORMAT"}

func newRootCmd(a *app) *cobra.Command {
	root := &cobra.Command{
		Use:   "alephvm",
		Short: "alephvm runs programs and instances from Aleph messages in virtual machines",
		Long: `alephvm is a compute resource node: it runs serverless programs and persistent
instances, described by Aleph PROGRAM and INSTANCE messages, in QEMU or
Firecracker virtual machines.

Settings come from defaults, then a config file (--config, $ALEPH_VM_CONFIG or
` + config.DefaultFile + ` when it exists), then ALEPH_VM_* environment
variables, then flags; each overrides the ones before. "alephvm config show"
prints the effective settings and where each came from.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       buildVersion(),
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return a.load()
		},
	}
	root.PersistentFlags().StringVar(&a.configFile, "config", "", "config file (YAML; default $ALEPH_VM_CONFIG, else "+config.DefaultFile+" if it exists)")
	a.globalFlags = config.BindFlags(root.PersistentFlags(), globalSettings...)
	root.AddCommand(
		newVersionCmd(),
		newConfigCmd(a),
		newMessageCmd(a),
		newInstanceCmd(a),
		newProgramCmd(a),
		newVMCmd(a),
		newTopCmd(a),
		newServeCmd(a),
		newRunCmd(a),
		newBaseImageCmd(a),
		newImageCmd(a),
		newStoreCmd(a),
		newStorageCmd(a),
		newDoctorCmd(a),
		newAssetsCmd(a),
	)
	return root
}

// load reads the configuration and builds the logger.
func (a *app) load() error {
	file := a.configFile
	if file == "" {
		for _, kv := range a.environ {
			if v, ok := strings.CutPrefix(kv, "ALEPH_VM_CONFIG="); ok {
				file = v
			}
		}
	}
	cfg, err := config.Load(file, a.environ, a.globalFlags, a.cmdFlags)
	if err != nil {
		return err
	}
	level, _ := config.ParseLevel(cfg.LogLevel) // checked by Load
	log, err := logging.New(a.stderr, cfg.LogFormat, level)
	if err != nil {
		return err
	}
	a.cfg, a.log = cfg, log
	return nil
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if info, ok := debug.ReadBuildInfo(); ok {
		rev, dirty := "", false
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if rev != "" {
			if len(rev) > 12 {
				rev = rev[:12]
			}
			if dirty {
				rev += "-dirty"
			}
			return "dev-" + rev
		}
		if info.Main.Version != "" && info.Main.Version != "(devel)" {
			return info.Main.Version
		}
	}
	return "dev"
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of alephvm",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "alephvm %s\n", buildVersion())
			return nil
		},
	}
}
