// Package config owns the node's settings: their names, defaults and
// documentation, and how they are read from a config file, ALEPH_VM_*
// environment variables and command-line flags.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

// EnvPrefix starts the name of every setting's environment variable.
const EnvPrefix = "ALEPH_VM_"

// DefaultFile is read when it exists and no other file is named.
const DefaultFile = "/etc/alephvm/config.yaml"

// Config holds every setting of the node. Each field's env tag names its
// environment variable (after EnvPrefix; the reference's name where it has
// one), its yaml tag its key in the config file, and its help tag what it
// does. The flag of a setting is its env name in lower case with dashes.
type Config struct {
	SupervisorHost string  `env:"SUPERVISOR_HOST" yaml:"supervisor_host" help:"Address the node's HTTP API listens on."`
	SupervisorPort int     `env:"SUPERVISOR_PORT" yaml:"supervisor_port" help:"Port the node's HTTP API listens on."`
	DomainName     string  `env:"DOMAIN_NAME" yaml:"domain_name" help:"Public domain name of the node; programs are also served at <base32 of hash>.<domain>."`
	ExecutionRoot  string  `env:"EXECUTION_ROOT" yaml:"execution_root" help:"Directory of the node's state: its database, VM runtime files and persistent volumes."`
	CacheRoot      string  `env:"CACHE_ROOT" yaml:"cache_root" help:"Directory of the content store: downloaded and built items, kept by hash."`
	AssetsDir      string  `env:"ASSETS_DIR" yaml:"assets_dir" help:"Directory of the VM assets: kernel, initramfs, default runtime and base image (alephvm assets build)."`
	APIServer      string  `env:"API_SERVER" yaml:"api_server" help:"URL of an Aleph core node API to fetch messages and files from; empty means local items only."`
	IPFSGateway    string  `env:"IPFS_GATEWAY" yaml:"ipfs_gateway" help:"URL of an IPFS gateway for IPFS items; empty means none."`
	ReuseTimeout   Seconds `env:"REUSE_TIMEOUT" yaml:"reuse_timeout" help:"How long a program VM stays warm after its last request (seconds, or a duration such as 10m); 0 stops it after each request."`
	LogLevel       string  `env:"LOG_LEVEL" yaml:"log_level" help:"Least severe log level written: debug, info, warn or error."`
	LogFormat      string  `env:"LOG_FORMAT" yaml:"log_format" help:"Log format: text (for a terminal) or json."`
}

// Default returns the settings used where nothing else is given.
func Default() Config {
	return Config{
		SupervisorHost: "127.0.0.1",
		SupervisorPort: 4020,
		DomainName:     "localhost",
		ExecutionRoot:  "/var/lib/alephvm",
		CacheRoot:      "/var/cache/alephvm",
		AssetsDir:      "/var/cache/alephvm/assets",
		ReuseTimeout:   Seconds(time.Hour),
		LogLevel:       "info",
		LogFormat:      "text",
	}
}

// Source says where a setting's effective value came from.
type Source string

// The sources of a setting, from the weakest to the strongest.
const (
	FromDefault Source = "default"
	FromFile    Source = "file"
	FromEnv     Source = "env"
	FromFlag    Source = "flag"
)

// Loaded is the effective configuration and where each value came from.
type Loaded struct {
	Config
	File    string            // the config file read, or ""
	Sources map[string]Source // by env name without the prefix
}

// Setting describes one setting of Config.
type Setting struct {
	Env     string // environment variable, with the prefix
	Key     string // name without the prefix, as in the env tag
	YAML    string // key in the config file
	Flag    string // command-line flag, without the dashes
	Help    string
	Default string
	field   int
}

// Settings lists every setting in the order of Config's fields.
func Settings() []Setting {
	t := reflect.TypeFor[Config]()
	def := reflect.ValueOf(Default())
	out := make([]Setting, 0, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		key := f.Tag.Get("env")
		out = append(out, Setting{
			Env:     EnvPrefix + key,
			Key:     key,
			YAML:    f.Tag.Get("yaml"),
			Flag:    strings.ReplaceAll(strings.ToLower(key), "_", "-"),
			Help:    f.Tag.Get("help"),
			Default: formatValue(def.Field(i)),
			field:   i,
		})
	}
	return out
}

func formatValue(v reflect.Value) string {
	if s, ok := v.Interface().(fmt.Stringer); ok {
		return s.String()
	}
	return fmt.Sprint(v.Interface())
}

// Value returns the setting's value in c, formatted as it would be written
// in the environment.
func (s Setting) Value(c Config) string {
	return formatValue(reflect.ValueOf(c).Field(s.field))
}

// Flags binds a flag for each of the named settings (all when none are
// named) to fs. Call Apply on the result after the flags are parsed.
type Flags struct {
	fs       *pflag.FlagSet
	settings []Setting
}

// BindFlags registers flags on fs for the settings named by env name
// without the prefix (SUPERVISOR_PORT), or for every setting.
func BindFlags(fs *pflag.FlagSet, keys ...string) *Flags {
	f := &Flags{fs: fs}
	for _, s := range Settings() {
		if len(keys) > 0 && !slices.Contains(keys, s.Key) {
			continue
		}
		fs.String(s.Flag, "", fmt.Sprintf("%s (env %s, default %q)", s.Help, s.Env, s.Default))
		f.settings = append(f.settings, s)
	}
	return f
}

// changed returns the flags given on the command line as environment
// variables, so that they are parsed exactly as the environment is.
func (f *Flags) changed() map[string]string {
	out := map[string]string{}
	if f == nil {
		return out
	}
	for _, s := range f.settings {
		if fl := f.fs.Lookup(s.Flag); fl != nil && fl.Changed {
			out[s.Env] = fl.Value.String()
		}
	}
	return out
}

// Load builds the effective configuration: defaults, then the config file
// (file, or DefaultFile when file is "" and it exists), then the
// environment, then the flags (nil ones are skipped), each overriding the
// ones before.
func Load(file string, environ []string, flags ...*Flags) (*Loaded, error) {
	l := &Loaded{Config: Default(), Sources: map[string]Source{}}
	for _, s := range Settings() {
		l.Sources[s.Key] = FromDefault
	}
	if file == "" {
		if _, err := os.Stat(DefaultFile); err == nil {
			file = DefaultFile
		}
	}
	if file != "" {
		if err := l.readFile(file); err != nil {
			return nil, err
		}
	}
	if err := l.parseEnv(env.ToMap(environ), FromEnv); err != nil {
		return nil, err
	}
	for _, f := range flags {
		if err := l.parseEnv(f.changed(), FromFlag); err != nil {
			return nil, err
		}
	}
	if err := l.Validate(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *Loaded) readFile(file string) error {
	data, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("read config file: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&l.Config); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config file %s: %w", file, err)
	}
	var keys map[string]any
	if err := yaml.Unmarshal(data, &keys); err != nil {
		return fmt.Errorf("config file %s: %w", file, err)
	}
	for _, s := range Settings() {
		if _, ok := keys[s.YAML]; ok {
			l.Sources[s.Key] = FromFile
		}
	}
	l.File = file
	return nil
}

// parseEnv applies the settings found in vars, one at a time so that an
// error names the variable or flag at fault.
func (l *Loaded) parseEnv(vars map[string]string, source Source) error {
	var errs []error
	for _, s := range Settings() {
		v, ok := vars[s.Env]
		if !ok {
			continue
		}
		err := env.ParseWithOptions(&l.Config, env.Options{Environment: map[string]string{s.Env: v}, Prefix: EnvPrefix})
		if err != nil {
			name := s.Env
			if source == FromFlag {
				name = "--" + s.Flag
			}
			var perr env.ParseError
			if errors.As(err, &perr) {
				err = perr.Err
			}
			errs = append(errs, fmt.Errorf("%s: invalid value %q: %w", name, v, err))
			continue
		}
		l.Sources[s.Key] = source
	}
	return errors.Join(errs...)
}

// Validate checks the settings' values.
func (c Config) Validate() error {
	var errs []error
	if c.SupervisorPort < 1 || c.SupervisorPort > 65535 {
		errs = append(errs, fmt.Errorf("%sSUPERVISOR_PORT: must be between 1 and 65535, got %d", EnvPrefix, c.SupervisorPort))
	}
	if _, err := ParseLevel(c.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("%sLOG_LEVEL: %w", EnvPrefix, err))
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("%sLOG_FORMAT: must be text or json, got %q", EnvPrefix, c.LogFormat))
	}
	if c.ReuseTimeout < 0 {
		errs = append(errs, fmt.Errorf("%sREUSE_TIMEOUT: must not be negative", EnvPrefix))
	}
	for _, dir := range []struct{ name, value string }{{"EXECUTION_ROOT", c.ExecutionRoot}, {"CACHE_ROOT", c.CacheRoot}, {"ASSETS_DIR", c.AssetsDir}} {
		if !strings.HasPrefix(dir.value, "/") {
			errs = append(errs, fmt.Errorf("%s%s: must be an absolute path, got %q", EnvPrefix, dir.name, dir.value))
		}
	}
	return errors.Join(errs...)
}

// ParseLevel reads a log level name.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("must be debug, info, warn or error, got %q", s)
	}
	return l, nil
}

// Seconds is a duration written as seconds ("3600", "0.5", as the
// reference writes them) or as a Go duration ("1h").
type Seconds time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Seconds) UnmarshalText(b []byte) error {
	text := strings.TrimSpace(string(b))
	if f, err := strconv.ParseFloat(text, 64); err == nil {
		*s = Seconds(f * float64(time.Second))
		return nil
	}
	d, err := time.ParseDuration(text)
	if err != nil {
		return fmt.Errorf("want seconds or a duration such as 10m, got %q", text)
	}
	*s = Seconds(d)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (s Seconds) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// String formats the duration as seconds.
func (s Seconds) String() string {
	return strconv.FormatFloat(time.Duration(s).Seconds(), 'f', -1, 64)
}

// Duration returns the value as a time.Duration.
func (s Seconds) Duration() time.Duration { return time.Duration(s) }

// Markdown documents every setting as a table.
func Markdown() string {
	var b strings.Builder
	b.WriteString("| Environment variable | Config file key | Flag | Default | Meaning |\n|---|---|---|---|---|\n")
	for _, s := range Settings() {
		def := s.Default
		if def == "" {
			def = "(empty)"
		}
		fmt.Fprintf(&b, "| `%s` | `%s` | `--%s` | `%s` | %s |\n", s.Env, s.YAML, s.Flag, def, s.Help)
	}
	return b.String()
}
