package config

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestPrecedence(t *testing.T) {
	file := writeFile(t, "supervisor_port: 5000\ndomain_name: file.example\nlog_level: debug\nreuse_timeout: 10m\n")
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	flags := BindFlags(fs)
	if err := fs.Parse([]string{"--log-level", "warn"}); err != nil {
		t.Fatal(err)
	}
	environ := []string{"ALEPH_VM_DOMAIN_NAME=env.example", "ALEPH_VM_LOG_LEVEL=error", "UNRELATED=1"}
	l, err := Load(file, environ, flags)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		value  string
		source Source
	}{
		"SUPERVISOR_PORT": {"5000", FromFile},
		"DOMAIN_NAME":     {"env.example", FromEnv},
		"LOG_LEVEL":       {"warn", FromFlag},
		"REUSE_TIMEOUT":   {"600", FromFile},
		"SUPERVISOR_HOST": {"127.0.0.1", FromDefault},
	}
	for _, s := range Settings() {
		w, ok := want[s.Key]
		if !ok {
			continue
		}
		if got := s.Value(l.Config); got != w.value || l.Sources[s.Key] != w.source {
			t.Errorf("%s = %q from %s, want %q from %s", s.Key, got, l.Sources[s.Key], w.value, w.source)
		}
	}
	if l.ReuseTimeout.Duration() != 10*time.Minute {
		t.Errorf("reuse timeout %v", l.ReuseTimeout.Duration())
	}
}

func TestSeconds(t *testing.T) {
	for in, want := range map[string]time.Duration{"3600": time.Hour, "0.5": 500 * time.Millisecond, "1h30m": 90 * time.Minute, "0": 0} {
		var s Seconds
		if err := s.UnmarshalText([]byte(in)); err != nil || s.Duration() != want {
			t.Errorf("%q: %v %v", in, s.Duration(), err)
		}
	}
	var s Seconds
	if err := s.UnmarshalText([]byte("soon")); err == nil {
		t.Error("accepted soon")
	}
}

func TestBytes(t *testing.T) {
	for in, want := range map[string]Bytes{"0": 0, "1073741824": 1 << 30, "50GiB": 50 << 30, "500MB": 500e6, "1.5G": 3 << 29, "2 KiB": 2048, "7B": 7} {
		var b Bytes
		if err := b.UnmarshalText([]byte(in)); err != nil || b != want {
			t.Errorf("%q: %d %v, want %d", in, b, err, want)
		}
	}
	for _, in := range []string{"", "lots", "-1GiB", "1e30TiB"} {
		var b Bytes
		if err := b.UnmarshalText([]byte(in)); err == nil {
			t.Errorf("accepted %q as %d", in, b)
		}
	}
	for b, want := range map[Bytes]string{0: "0", 50 << 30: "50GiB", 1536: "1536", 1 << 40: "1TiB", 1000: "1000"} {
		if got := b.String(); got != want {
			t.Errorf("%d formats as %q, want %q", b, got, want)
		}
	}
	for b, want := range map[Bytes]string{0: "0 B", 1023: "1023 B", 1536: "1.5 KiB", 5 << 30: "5.0 GiB"} {
		if got := b.Human(); got != want {
			t.Errorf("%d for people is %q, want %q", b, got, want)
		}
	}
	l, err := Load(writeFile(t, "cache_max_size: 2GiB\n"), []string{"ALEPH_VM_DOWNLOAD_STALL_TIMEOUT=30"})
	if err != nil || l.CacheMaxSize != 2<<30 || l.StallTimeout.Duration() != 30*time.Second {
		t.Errorf("loaded %v %v: %v", l.CacheMaxSize, l.StallTimeout, err)
	}
}

func TestErrors(t *testing.T) {
	cases := []struct {
		name    string
		file    string
		environ []string
		want    string
	}{
		{"unknown file key", "supervisor_prot: 1\n", nil, "supervisor_prot"},
		{"bad env int", "", []string{"ALEPH_VM_SUPERVISOR_PORT=http"}, "SUPERVISOR_PORT"},
		{"port range", "", []string{"ALEPH_VM_SUPERVISOR_PORT=70000"}, "between 1 and 65535"},
		{"log level", "", []string{"ALEPH_VM_LOG_LEVEL=loud"}, "LOG_LEVEL"},
		{"log format", "log_format: xml\n", nil, "LOG_FORMAT"},
		{"relative root", "", []string{"ALEPH_VM_EXECUTION_ROOT=var/lib"}, "absolute path"},
		{"negative timeout", "", []string{"ALEPH_VM_REUSE_TIMEOUT=-1"}, "REUSE_TIMEOUT"},
		{"zero stall timeout", "", []string{"ALEPH_VM_DOWNLOAD_STALL_TIMEOUT=0"}, "DOWNLOAD_STALL_TIMEOUT"},
		{"bad size", "cache_max_size: huge\n", nil, "want a size such as 50GiB"},
		{"zero item size", "", []string{"ALEPH_VM_STORE_MAX_ITEM_SIZE=0"}, "STORE_MAX_ITEM_SIZE"},
		{"negative item size", "", []string{"ALEPH_VM_STORE_MAX_ITEM_SIZE=-1"}, "STORE_MAX_ITEM_SIZE"},
		{"negative free space", "cache_min_free_space: -5GiB\n", nil, "want a size"},
		{"zero part age", "", []string{"ALEPH_VM_DOWNLOAD_PART_MAX_AGE=0"}, "DOWNLOAD_PART_MAX_AGE"},
		{"negative message age", "", []string{"ALEPH_VM_STORE_MESSAGE_MAX_AGE=-1h"}, "STORE_MESSAGE_MAX_AGE"},
		{"program hypervisor", "", []string{"ALEPH_VM_PROGRAM_HYPERVISOR=kvm"}, "PROGRAM_HYPERVISOR"},
		{"unknown hypervisor", "hypervisors: [qemu, xen]\n", nil, `"xen" is neither`},
		{"jail uid 0", "", []string{"ALEPH_VM_JAILER_FIRST_UID=0"}, "JAILER_FIRST_UID"},
		{"qemu uid 0", "", []string{"ALEPH_VM_QEMU_FIRST_UID=0"}, "QEMU_FIRST_UID"},
		{"qemu uid past the end", "", []string{"ALEPH_VM_QEMU_FIRST_UID=4294967290"}, "QEMU_FIRST_UID"},
		{"qemu uids in the jail's", "", []string{"ALEPH_VM_QEMU_FIRST_UID=1065535"}, "overlap"},
		{"jail uids in qemu's", "", []string{"ALEPH_VM_JAILER_FIRST_UID=1034465"}, "overlap"},
		{"qemu as uid 0", "qemu_runas: \"0:0\"\n", nil, "QEMU_RUNAS"},
		{"use jailer", "", []string{"ALEPH_VM_USE_JAILER=maybe"}, "USE_JAILER"},
		{"tiny console", "", []string{"ALEPH_VM_CONSOLE_LOG_MAX_SIZE=1KiB"}, "CONSOLE_LOG_MAX_SIZE"},
		{"no published port", "", []string{"ALEPH_VM_MAX_PUBLISHED_PORTS=0"}, "MAX_PUBLISHED_PORTS"},
		{"ports past 65535", "", []string{"ALEPH_VM_MAX_PUBLISHED_PORTS=70000"}, "MAX_PUBLISHED_PORTS"},
		{"no read timeout", "", []string{"ALEPH_VM_HTTP_READ_TIMEOUT=0"}, "HTTP_READ_TIMEOUT"},
		{"negative idle timeout", "", []string{"ALEPH_VM_HTTP_IDLE_TIMEOUT=-1"}, "HTTP_IDLE_TIMEOUT"},
		{"followers take every connection", "", []string{"ALEPH_VM_HTTP_MAX_CONNECTIONS=100", "ALEPH_VM_LOGS_MAX_FOLLOWERS=100"}, "HTTP_MAX_CONNECTIONS"},
		{"no follower per VM", "", []string{"ALEPH_VM_LOGS_MAX_FOLLOWERS_PER_VM=0"}, "LOGS_MAX_FOLLOWERS_PER_VM"},
		{"every origin", "", []string{"ALEPH_VM_WEBSOCKET_ALLOWED_ORIGINS=*"}, "WEBSOCKET_ALLOWED_ORIGINS"},
		{"bad origin pattern", "", []string{"ALEPH_VM_WEBSOCKET_ALLOWED_ORIGINS=[a"}, "WEBSOCKET_ALLOWED_ORIGINS"},
		{"allowed network not a network", "", []string{"ALEPH_VM_GUEST_ALLOWED_NETWORKS=10.0.0.0/8,banana"}, `"banana" is not a network`},
		{"allowed network host bits", "guest_allowed_networks: [10.1.2.3/24]\n", nil, "10.1.2.0/24?"},
		{"allowed network too long", "", []string{"ALEPH_VM_GUEST_ALLOWED_NETWORKS=10.0.0.0/33"}, "GUEST_ALLOWED_NETWORKS"},
		{"allowed network everything", "", []string{"ALEPH_VM_GUEST_ALLOWED_NETWORKS=0.0.0.0/0"}, "allows every address"},
		{"allowed network everything v6", "", []string{`ALEPH_VM_GUEST_ALLOWED_NETWORKS=["::/0"]`}, "allows every address"},
		{"allowed network zoned", "", []string{"ALEPH_VM_GUEST_ALLOWED_NETWORKS=fe80::1%eth0"}, "is not a network"},
		{"allowed network mapped", "", []string{"ALEPH_VM_GUEST_ALLOWED_NETWORKS=::ffff:10.0.0.0/104"}, "(10.0.0.0/8)"},
		{"allowed network bad JSON", "", []string{`ALEPH_VM_GUEST_ALLOWED_NETWORKS=["10.0.0.0/8"`}, "GUEST_ALLOWED_NETWORKS"},
		// Numbers that do not fit: refused for what they are, not taken
		// as whatever a float's conversion to an integer makes of them.
		{"NaN seconds", "", []string{"ALEPH_VM_REUSE_TIMEOUT=NaN"}, "REUSE_TIMEOUT: invalid value \"NaN\": want a finite number"},
		{"infinite seconds", "", []string{"ALEPH_VM_HTTP_IDLE_TIMEOUT=+Inf"}, "HTTP_IDLE_TIMEOUT: invalid value"},
		{"seconds past a duration", "", []string{"ALEPH_VM_HTTP_READ_TIMEOUT=1e300"}, "HTTP_READ_TIMEOUT: invalid value \"1e300\": want a finite number"},
		{"NaN bytes", "", []string{"ALEPH_VM_CACHE_MAX_SIZE=NaN"}, "CACHE_MAX_SIZE: invalid value"},
		{"bytes past an int64", "", []string{"ALEPH_VM_STORE_MAX_ITEM_SIZE=9223372036854775807"}, "STORE_MAX_ITEM_SIZE: invalid value"},
		{"negative init timeout", "", []string{"ALEPH_VM_INIT_TIMEOUT=-1"}, "INIT_TIMEOUT: must be positive"},
		{"zero signature age", "", []string{"ALEPH_VM_ALLOCATION_SIGNATURE_MAX_AGE_SECONDS=0"}, "ALLOCATION_SIGNATURE_MAX_AGE_SECONDS: must be positive"},
		{"no request body", "", []string{"ALEPH_VM_MAX_REQUEST_BODY=0"}, "MAX_REQUEST_BODY: must be positive"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			file := ""
			if tc.file != "" {
				file = writeFile(t, tc.file)
			}
			_, err := Load(file, tc.environ)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml"), nil); err == nil {
		t.Error("a named config file that does not exist was accepted")
	}
}

// TestDocsUpToDate keeps docs/configuration.md, the operators' reference,
// in step with the settings.
func TestDocsUpToDate(t *testing.T) {
	data, err := os.ReadFile("../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), Markdown()) {
		t.Errorf("docs/configuration.md is out of date: paste the output of `alephvm config doc` into it")
	}
}

func TestGuestAllowedNetworks(t *testing.T) {
	l, err := Load("", []string{"ALEPH_VM_GUEST_ALLOWED_NETWORKS=10.1.0.0/16, 192.168.7.9,fd00:1::/64"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := l.GuestAllowedPrefixes()
	if err != nil || fmt.Sprint(got) != "[10.1.0.0/16 192.168.7.9/32 fd00:1::/64]" {
		t.Errorf("%v %v", got, err)
	}
	if got, err := Default().GuestAllowedPrefixes(); err != nil || got != nil {
		t.Errorf("default: %v %v", got, err)
	}
}

func TestList(t *testing.T) {
	for in, want := range map[string]string{`["a b", "c"]`: `["a b","c"]`, "a, b ,": `["a","b"]`, "": ""} {
		var l List
		if err := l.UnmarshalText([]byte(in)); err != nil || l.String() != want {
			t.Errorf("%q: %s %v", in, l, err)
		}
	}
	file := writeFile(t, "developer_ssh_keys:\n  - ssh-ed25519 AAAA one\n  - ssh-ed25519 BBBB two\ndns_nameservers: 9.9.9.9\n")
	l, err := Load(file, nil)
	if err != nil || len(l.DeveloperSSHKeys) != 2 || l.DNSNameservers[0] != "9.9.9.9" {
		t.Errorf("%+v %v", l, err)
	}
	if _, err := Load("", []string{"ALEPH_VM_DNS_NAMESERVERS=not-an-ip"}); err == nil {
		t.Error("bad resolver accepted")
	}
}

// TestExample checks the commented config file the package installs: as
// it is, it sets nothing; with every setting's line uncommented, it sets
// every setting to its default, from the file.
func TestExample(t *testing.T) {
	example := Example()
	l, err := Load(writeFile(t, example), nil)
	if err != nil {
		t.Fatalf("the example does not load: %v", err)
	}
	for key, source := range l.Sources {
		if source != FromDefault {
			t.Errorf("the commented example sets %s", key)
		}
	}
	var uncommented []string
	settingLine := regexp.MustCompile(`^#([a-z0-9_]+):( |$)`)
	listItem := regexp.MustCompile(`^#  - `) // of a long list, as a block sequence
	seen := map[string]int{}
	for _, line := range strings.Split(example, "\n") {
		if m := settingLine.FindStringSubmatch(line); m != nil {
			seen[m[1]]++
			line = strings.TrimPrefix(line, "#")
		} else if listItem.MatchString(line) {
			line = strings.TrimPrefix(line, "#")
		} else if line != "" && !strings.HasPrefix(line, "# ") && line != "#" {
			t.Errorf("line neither prose nor a setting: %q", line)
		}
		if len(line) > 80 {
			t.Errorf("line longer than 80 characters: %q", line)
		}
		uncommented = append(uncommented, line)
	}
	l, err = Load(writeFile(t, strings.Join(uncommented, "\n")), nil)
	if err != nil {
		t.Fatalf("the uncommented example does not load: %v", err)
	}
	for _, s := range Settings() {
		if seen[s.YAML] != 1 {
			t.Errorf("%s appears %d times in the example", s.YAML, seen[s.YAML])
		}
		if got := s.Value(l.Config); got != s.Default || l.Sources[s.Key] != FromFile {
			t.Errorf("%s: uncommented it reads back as %q from %s, want the default %q from the file", s.YAML, got, l.Sources[s.Key], s.Default)
		}
		if !strings.Contains(example, s.Env) {
			t.Errorf("the example does not name %s", s.Env)
		}
	}
}

func TestYAMLScalar(t *testing.T) {
	for _, tc := range []struct {
		in   any
		want string
	}{
		{"", `""`}, {"127.0.0.1", "127.0.0.1"}, {"yes", `"yes"`}, {"a: b", `'a: b'`}, {"#x", `'#x'`},
		{List(nil), "[]"}, {List{"a b", `c"d`}, `["a b","c\"d"]`}, {Bytes(50 << 30), "50GiB"}, {Seconds(90 * time.Second), "90"},
		{4.5, "4.5"}, {true, "true"}, {4020, "4020"},
	} {
		if got := yamlScalar(reflect.ValueOf(tc.in)); got != tc.want {
			t.Errorf("%#v: %s, want %s", tc.in, got, tc.want)
		}
	}
}
