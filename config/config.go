// Package config owns the node's settings: their names, defaults and
// documentation, and how they are read from a config file, ALEPH_VM_*
// environment variables and command-line flags.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/netip"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/alephvm/alephvm/message"
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
	SupervisorHost      string  `env:"SUPERVISOR_HOST" yaml:"supervisor_host" help:"Address the node's HTTP API listens on."`
	SupervisorPort      int     `env:"SUPERVISOR_PORT" yaml:"supervisor_port" help:"Port the node's HTTP API listens on."`
	DomainName          string  `env:"DOMAIN_NAME" yaml:"domain_name" help:"Public domain name of the node; programs are also served at <base32 of hash>.<domain>."`
	ExecutionRoot       string  `env:"EXECUTION_ROOT" yaml:"execution_root" help:"Directory of the node's state: its database, VM runtime files and persistent volumes."`
	CacheRoot           string  `env:"CACHE_ROOT" yaml:"cache_root" help:"Directory of the content store: downloaded and built items, kept by hash."`
	AssetsDir           string  `env:"ASSETS_DIR" yaml:"assets_dir" help:"Directory of the VM assets: kernel, initramfs, default runtime and base image (alephvm assets build); empty means <CACHE_ROOT>/assets."`
	APIServer           string  `env:"API_SERVER" yaml:"api_server" help:"URL of an Aleph core node API to fetch messages and files from; empty means local items only."`
	IPFSGateway         string  `env:"IPFS_GATEWAY" yaml:"ipfs_gateway" help:"URL of an IPFS gateway for IPFS items; empty means none."`
	GuestCacheMaxValue  Bytes   `env:"GUEST_CACHE_MAX_VALUE_SIZE" yaml:"guest_cache_max_value_size" help:"Largest value a program may keep in the guest API's cache (bytes, or 1MiB); larger ones are refused 413."`
	GuestCacheMaxKeys   int     `env:"GUEST_CACHE_MAX_KEYS" yaml:"guest_cache_max_keys" help:"Most keys one program may keep in the guest API's cache; more are refused 507."`
	GuestCacheMaxSize   Bytes   `env:"GUEST_CACHE_MAX_SIZE" yaml:"guest_cache_max_size" help:"Most bytes the guest API's cache holds for all programs together; past it writes are refused 507. Entries expire after 7 days."`
	ConnectivityIPv4    string  `env:"CONNECTIVITY_IPV4_URL" yaml:"connectivity_ipv4_url" help:"URL by IPv4 address /status/check/host fetches to check the host's IPv4 egress (any HTTP answer passes)."`
	ConnectivityIPv6    string  `env:"CONNECTIVITY_IPV6_URL" yaml:"connectivity_ipv6_url" help:"URL by IPv6 address /status/check/host fetches to check the host's IPv6 egress."`
	ConnectivityDNS     string  `env:"CONNECTIVITY_DNS_HOSTNAME" yaml:"connectivity_dns_hostname" help:"Name /status/check/host resolves for an IPv4 and an IPv6 address."`
	ConnectivityHTTP    List    `env:"CONNECTIVITY_HTTP_URLS" yaml:"connectivity_http_urls" help:"URLs by name /status/check/host tries in order over each family (advisory: their failure does not fail the check)."`
	WatchMessages       bool    `env:"WATCH_FOR_MESSAGES" yaml:"watch_for_messages" help:"Read API_SERVER's message feed and deliver to programs the messages they subscribe to (on.message), booting them as a request would."`
	NodeHash            string  `env:"NODE_HASH" yaml:"node_hash" help:"This node's hash on the Aleph network (its registration); messages pinned to another node are refused 400, and pinned ones are refused 503 while it is empty. Shown by /status/config."`
	CheckFastAPIVMID    string  `env:"CHECK_FASTAPI_VM_ID" yaml:"check_fastapi_vm_id" help:"Item hash of the diagnostic program /status/check/fastapi checks; empty means the node's own (examples/diagnostic, stored with the default runtime at the first check)."`
	LegacyCheckVMID     string  `env:"LEGACY_CHECK_FASTAPI_VM_ID" yaml:"legacy_check_fastapi_vm_id" help:"Item hash of the diagnostic program /status/check/fastapi/legacy checks; empty means none (503)."`
	DiagnosticDNSName   string  `env:"DIAGNOSTIC_DNS_NAME" yaml:"diagnostic_dns_name" help:"Name the node's own diagnostic program resolves for its dns check (IPv4 and IPv6 answers wanted); empty means example.org."`
	DiagnosticIPv4URLs  List    `env:"DIAGNOSTIC_IPV4_URLS" yaml:"diagnostic_ipv4_urls" help:"URLs by IPv4 address the node's own diagnostic program tries for its ipv4 check (any one answering passes); empty means the reference's public DNS services."`
	DiagnosticIPv6URLs  List    `env:"DIAGNOSTIC_IPV6_URLS" yaml:"diagnostic_ipv6_urls" help:"URLs by IPv6 address the diagnostic program tries for IPv6 connectivity; empty means the reference's public DNS services."`
	DiagnosticWebURLs   List    `env:"DIAGNOSTIC_INTERNET_URLS" yaml:"diagnostic_internet_urls" help:"URLs by name the node's own diagnostic program tries for its internet check (DNS, IP and HTTP together); empty means the reference's (aleph.im, ethereum.org, ipfs.io)."`
	DiagnosticMessage   string  `env:"DIAGNOSTIC_MESSAGE" yaml:"diagnostic_message" help:"Item hash of the message the node's own diagnostic program reads through the guest API (messages and get_a_message checks); empty means the reference's."`
	CacheMaxSize        Bytes   `env:"CACHE_MAX_SIZE" yaml:"cache_max_size" help:"Size past which the content store evicts downloaded files, least recently used first (bytes, or 50GiB, 500MB); files in use by a VM and files added on this node are never evicted; 0 means no limit."`
	DiskFreeFloor       Bytes   `env:"DISK_FREE_FLOOR" yaml:"disk_free_floor" help:"Free space (bytes, or 2GiB) that must stay on the filesystem of the volumes and VM runtime files once a new root disk or volume is fully written; one that would leave less is refused (507). A VM is refused (507) before anything is made for it when its root disk and volumes, plus what running VMs' disks may still grow by, would leave less."`
	BackupDirectory     string  `env:"BACKUP_DIRECTORY" yaml:"backup_directory" help:"Where instances' backups are kept (<id>.tar with its .tar.sha256 and .tar.meta.json) and restore uploads received; empty means <EXECUTION_ROOT>/backups. Keep it on the filesystem of EXECUTION_ROOT: a restored disk is moved, not copied, into place."`
	BackupsPerVM        int     `env:"BACKUPS_PER_VM" yaml:"backups_per_vm" help:"How many backups of one instance are kept. With 1, a backup younger than BACKUP_MAX_AGE is answered again rather than made anew, as in the reference; with more, each POST /control/machine/{ref}/backup makes a new one and the oldest beyond this count is removed once it is complete."`
	BackupMaxAge        Seconds `env:"BACKUP_MAX_AGE" yaml:"backup_max_age" help:"How long a backup is kept (seconds, or a duration such as 24h); older ones are removed when the backup routes are called."`
	BackupCompression   string  `env:"BACKUP_COMPRESSION" yaml:"backup_compression" help:"Compression of a backup's qcow2 clusters: zstd (about nine times faster than zlib for the same size; QEMU reads it since 5.1) or zlib (the reference's qemu-img convert -c, for older readers)."`
	MaxRestoreUpload    Bytes   `env:"MAX_RESTORE_UPLOAD_BYTES" yaml:"max_restore_upload_bytes" help:"Largest root disk a restore accepts as an upload (bytes, or 100GiB), besides the instance's rootfs.size_mib."`
	StallTimeout        Seconds `env:"DOWNLOAD_STALL_TIMEOUT" yaml:"download_stall_timeout" help:"A download that receives no byte for this long is dropped and retried (seconds, or a duration such as 2m)."`
	MaxItemSize         Bytes   `env:"STORE_MAX_ITEM_SIZE" yaml:"store_max_item_size" help:"Largest file the content store downloads: the limit of a STORE message that gives no size (or a negative one) and of the file an IPFS DAG expands to; a message giving more is refused."`
	MinFreeSpace        Bytes   `env:"CACHE_MIN_FREE_SPACE" yaml:"cache_min_free_space" help:"Free space kept on the filesystem of CACHE_ROOT: a download that would go below it is refused (HTTP 507) or stopped and its partial file removed; 0 means no floor."`
	PartMaxAge          Seconds `env:"DOWNLOAD_PART_MAX_AGE" yaml:"download_part_max_age" help:"How long the partial file of an interrupted download is kept to resume it; the node removes older ones every 10 minutes."`
	MessageMaxAge       Seconds `env:"STORE_MESSAGE_MAX_AGE" yaml:"store_message_max_age" help:"How long a message fetched from the network is kept when no execution, cached file or local message needs it; the node forgets older ones every 10 minutes."`
	ReuseTimeout        Seconds `env:"REUSE_TIMEOUT" yaml:"reuse_timeout" help:"How long a program VM stays warm after its last request (seconds, or a duration such as 10m); 0 stops it after each request."`
	NetworkInterface    string  `env:"NETWORK_INTERFACE" yaml:"network_interface" help:"Interface towards the outside world, where VM traffic is masqueraded and port forwards arrive; empty means the interface of the default route."`
	IPv4AddressPool     string  `env:"IPV4_ADDRESS_POOL" yaml:"ipv4_address_pool" help:"IPv4 range the VMs' networks are taken from."`
	IPv4PrefixLength    int     `env:"IPV4_NETWORK_PREFIX_LENGTH" yaml:"ipv4_network_prefix_length" help:"Prefix length of each VM's network; the host is .1 and the guest .2 of it."`
	UseNDPProxy         bool    `env:"USE_NDP_PROXY" yaml:"use_ndp_proxy" help:"Answer IPv6 neighbour solicitations on the uplink for the VMs' addresses: for an IPV6_ADDRESS_POOL that is on the uplink's link rather than routed to the node."`
	IPv6AddressPool     string  `env:"IPV6_ADDRESS_POOL" yaml:"ipv6_address_pool" help:"IPv6 /64 (or larger) from which each VM gets a /124 derived from its hash; empty means no IPv6."`
	LayerMaxDepth       int     `env:"LAYER_MAX_DEPTH" yaml:"layer_max_depth" help:"Most qcow2 layers an instance's base image may stack over its base, each naming its parent by item hash (docs/layers.md); a deeper chain is refused with 400."`
	MaxPublishedPorts   int     `env:"MAX_PUBLISHED_PORTS" yaml:"max_published_ports" help:"Most ports one instance may publish (forward from the host); a message asking for more is refused with 400."`
	DNSNameservers      List    `env:"DNS_NAMESERVERS" yaml:"dns_nameservers" help:"DNS servers given to guests (a JSON list or commas); empty means the host's upstream servers (resolvectl, then /etc/resolv.conf)."`
	GuestAllowedNets    List    `env:"GUEST_ALLOWED_NETWORKS" yaml:"guest_allowed_networks" help:"Networks VMs with internet may reach through the uplink although they are private (RFC 1918, ULA, 100.64.0.0/10), link-local (169.254.0.0/16, where clouds serve their metadata) or routed by the host other than by its default route: prefixes or addresses, a JSON list or commas; empty means none. The guests' DNS servers are reachable on port 53 in any case."`
	QEMUAccel           string  `env:"QEMU_ACCEL" yaml:"qemu_accel" help:"QEMU accelerator: kvm, tcg, or auto (kvm when a probe guest runs under it)."`
	QEMURunAs           string  `env:"QEMU_RUNAS" yaml:"qemu_runas" help:"Who QEMU runs as once it has opened the VM's files and devices: empty for a uid and gid of its own per VM (from QEMU_FIRST_UID); a user name or uid:gid shared by every VM (never uid 0); or root, for debugging only (logged as a warning)."`
	QEMUFirstUID        int     `env:"QEMU_FIRST_UID" yaml:"qemu_first_uid" help:"First of the 65536 uids (and gids) given to QEMU processes, one per VM, when QEMU_RUNAS is empty; apart from the jailer's range and from the host's users."`
	ConsoleLogMaxSize   Bytes   `env:"CONSOLE_LOG_MAX_SIZE" yaml:"console_log_max_size" help:"Most of a VM's serial console kept on disk, in console.log and the rotated console.log.1 (half each); at least 64KiB. The guest never waits on its console: output past what the hypervisor buffers (1 MiB) while the node is down is lost."`
	UEFICode            string  `env:"UEFI_FIRMWARE_CODE" yaml:"uefi_firmware_code" help:"UEFI firmware code (read-only) for instances whose base image boots by itself (Debian: apt-get install ovmf)."`
	UEFIVars            string  `env:"UEFI_FIRMWARE_VARS" yaml:"uefi_firmware_vars" help:"Template of the UEFI variable store each such instance gets a copy of."`
	ProgramKernel       string  `env:"LINUX_PATH" yaml:"linux_path" help:"Kernel of program VMs (a bzImage for QEMU)."`
	ProgramVmlinux      string  `env:"LINUX_VMLINUX_PATH" yaml:"linux_vmlinux_path" help:"Kernel of program VMs under Firecracker (the same kernel, an uncompressed vmlinux)."`
	ProgramSnapshots    bool    `env:"PROGRAM_SNAPSHOTS" yaml:"program_snapshots" help:"Start program VMs by restoring a snapshot of a booted one (a template per kernel, initramfs, runtime, vCPUs and memory, built in the background on first use) instead of booting them; QEMU only. A failed restore boots the VM and is logged. Templates live in CACHE_ROOT/templates."`
	ProgramOwnSnapshots bool    `env:"PROGRAM_SNAPSHOTS_PER_PROGRAM" yaml:"program_snapshots_per_program" help:"With PROGRAM_SNAPSHOTS: after a program's first start from a template, also snapshot that program with its workload started (in a VM of its own, without network), and start its later cold starts from that snapshot, given their own network at resume. Only programs that are not persistent and have no writable volume. The snapshot holds the program's memory: a value its workload drew at start-up is the same in each VM started from it (see docs/snapshots.md)."`
	ProgramInitrd       string  `env:"INITRD_PATH" yaml:"initrd_path" help:"Initramfs of program VMs, holding the guest init."`
	FakeInstanceBase    string  `env:"FAKE_INSTANCE_BASE" yaml:"fake_instance_base" help:"Developer mode (serve --run-fake-instance): the base image file of the fake instance; empty means the built base image's UEFI disk."`
	FakeInstanceMessage string  `env:"FAKE_INSTANCE_MESSAGE" yaml:"fake_instance_message" help:"Developer mode: the INSTANCE message file of the fake instance; its rootfs parent is replaced by the fake base image."`
	InstanceHypervisor  string  `env:"INSTANCE_DEFAULT_HYPERVISOR" yaml:"instance_default_hypervisor" help:"Hypervisor of instances whose message names none: qemu or firecracker."`
	ProgramHypervisor   string  `env:"PROGRAM_HYPERVISOR" yaml:"program_hypervisor" help:"Hypervisor of programs: auto (firecracker where this host runs it, else qemu), firecracker or qemu."`
	Hypervisors         List    `env:"HYPERVISORS" yaml:"hypervisors" help:"Hypervisors this node may use (qemu, firecracker); a message that asks for another is refused."`
	FirecrackerPath     string  `env:"FIRECRACKER_PATH" yaml:"firecracker_path" help:"Firecracker binary (v1.16.1): a path, or a name looked up in PATH."`
	JailerPath          string  `env:"JAILER_PATH" yaml:"jailer_path" help:"Firecracker's jailer binary: a path, or a name looked up in PATH."`
	UseJailer           bool    `env:"USE_JAILER" yaml:"use_jailer" help:"Run each Firecracker through the jailer (chroot, a uid of its own, PID namespace, cgroup limits); turn off for development only."`
	JailerBaseDirectory string  `env:"JAILER_BASE_DIRECTORY" yaml:"jailer_base_directory" help:"Where the jailer makes each VM's chroot; empty means <EXECUTION_ROOT>/jail. Keep it on the filesystem of CACHE_ROOT and EXECUTION_ROOT, so that files are hard-linked into jails, not bind-mounted."`
	JailerFirstUID      int     `env:"JAILER_FIRST_UID" yaml:"jailer_first_uid" help:"First of the 65536 uids (and gids) given to jailed VMs, one per VM."`
	HostMemoryReserved  int     `env:"HOST_MEMORY_RESERVED_MIB" yaml:"host_memory_reserved_mib" help:"Memory (MiB) kept for the host: VMs get the rest (the node refuses to start when nothing is left)."`
	VCPUOvercommit      float64 `env:"VCPU_OVERCOMMIT_FACTOR" yaml:"vcpu_overcommit_factor" help:"vCPUs handed out per host CPU."`
	InitTimeout         Seconds `env:"INIT_TIMEOUT" yaml:"init_timeout" help:"How long a program VM may take from start to its workload accepting connections."`
	MaxRequestBody      Bytes   `env:"MAX_REQUEST_BODY" yaml:"max_request_body" help:"Largest request body proxied to a program."`
	HTTPHeaderTimeout   Seconds `env:"HTTP_HEADER_TIMEOUT" yaml:"http_header_timeout" help:"How long a client may take to send a request's headers, on every route: a connection that has not sent them whole by then is closed."`
	HTTPReadTimeout     Seconds `env:"HTTP_READ_TIMEOUT" yaml:"http_read_timeout" help:"How long a client may take to send a whole request, body included, on the routes that do not stream (program requests and logs websockets stream)."`
	HTTPWriteTimeout    Seconds `env:"HTTP_WRITE_TIMEOUT" yaml:"http_write_timeout" help:"How long a client may take to read an answer that does not stream, from its first byte, a logs websocket client to take one line, and a program's client to take any byte of its answer (one that stops reading is cut)."`
	HTTPIdleTimeout     Seconds `env:"HTTP_IDLE_TIMEOUT" yaml:"http_idle_timeout" help:"How long a kept-alive connection may wait for its next request."`
	HTTPMaxConnections  int     `env:"HTTP_MAX_CONNECTIONS" yaml:"http_max_connections" help:"Most connections the HTTP API serves at once; more wait to be accepted."`
	WebsocketOrigins    List    `env:"WEBSOCKET_ALLOWED_ORIGINS" yaml:"websocket_allowed_origins" help:"Web origins (host patterns such as console.example.com or *.example.com) whose pages may open a logs websocket; clients that send no Origin and the node's own pages always may."`
	LogsMaxFollowers    int     `env:"LOGS_MAX_FOLLOWERS" yaml:"logs_max_followers" help:"Most logs websockets open at once on the node (fewer than HTTP_MAX_CONNECTIONS)."`
	LogsMaxFollowersVM  int     `env:"LOGS_MAX_FOLLOWERS_PER_VM" yaml:"logs_max_followers_per_vm" help:"Most logs websockets open at once for one VM."`
	AllocationTokenHash string  `env:"ALLOCATION_TOKEN_HASH" yaml:"allocation_token_hash" help:"Hex sha256 of the token the scheduler may send as X-Auth-Signature (deprecated scheme); empty disables it."`
	AllocationSigners   List    `env:"AUTHORIZED_ALLOCATION_SIGNERS" yaml:"authorized_allocation_signers" help:"Ethereum addresses allowed to sign scheduler calls (Aleph-EIP191-V1); empty means the reference's default signer."`
	AllocationMaxAge    Seconds `env:"ALLOCATION_SIGNATURE_MAX_AGE_SECONDS" yaml:"allocation_signature_max_age_seconds" help:"How far a signed call's iat may be from now."`
	OperatorAddresses   List    `env:"OPERATOR_ADDRESSES" yaml:"operator_addresses" help:"Wallet addresses (Ethereum or Solana) that may stop, reboot, reinstall and read the logs of every VM through the owner scheme of the Aleph SDKs, as owners do their own."`
	AllocationToken     string  `env:"ALLOCATION_TOKEN" yaml:"allocation_token" help:"Token the CLI sends to the node as X-Auth-Signature (client side)."`
	DeveloperSSHKeys    List    `env:"DEVELOPER_SSH_KEYS" yaml:"developer_ssh_keys" help:"SSH public keys added to every instance (a JSON list)."`
	LogLevel            string  `env:"LOG_LEVEL" yaml:"log_level" help:"Least severe log level written: debug, info, warn or error."`
	LogFormat           string  `env:"LOG_FORMAT" yaml:"log_format" help:"Log format: text (for a terminal) or json."`
}

// Default returns the settings used where nothing else is given.
func Default() Config {
	return Config{
		SupervisorHost:     "127.0.0.1",
		SupervisorPort:     4020,
		DomainName:         "localhost",
		ExecutionRoot:      "/var/lib/alephvm",
		CacheRoot:          "/var/cache/alephvm",
		CacheMaxSize:       50 << 30,
		WatchMessages:      true,
		ConnectivityIPv4:   "https://1.1.1.1/",
		ConnectivityIPv6:   "https://[2606:4700:4700::1111]/",
		ConnectivityDNS:    "example.org",
		ConnectivityHTTP:   List{"http://detectportal.firefox.com/success.txt", "https://connectivity-check.ubuntu.com/", "https://www.gstatic.com/generate_204"},
		GuestCacheMaxValue: 1 << 20,
		GuestCacheMaxKeys:  10_000,
		GuestCacheMaxSize:  1 << 30,
		DiskFreeFloor:      2 << 30,
		BackupsPerVM:       1,
		BackupMaxAge:       Seconds(24 * time.Hour),
		BackupCompression:  "zstd",
		MaxRestoreUpload:   100 << 30,
		StallTimeout:       Seconds(2 * time.Minute),
		MaxItemSize:        20 << 30,
		LayerMaxDepth:      8,
		MinFreeSpace:       2 << 30,
		PartMaxAge:         Seconds(24 * time.Hour),
		MessageMaxAge:      Seconds(7 * 24 * time.Hour),
		ReuseTimeout:       Seconds(time.Hour),
		IPv4AddressPool:    "172.16.0.0/12",
		IPv4PrefixLength:   24,
		QEMUAccel:          "auto",
		QEMUFirstUID:       1100000,
		InstanceHypervisor: "qemu",
		UEFICode:           "/usr/share/OVMF/OVMF_CODE_4M.fd",
		UEFIVars:           "/usr/share/OVMF/OVMF_VARS_4M.fd",
		ProgramHypervisor:  "auto",
		Hypervisors:        List{"qemu", "firecracker"},
		FirecrackerPath:    "firecracker",
		JailerPath:         "jailer",
		UseJailer:          true,
		JailerFirstUID:     1000000,
		HostMemoryReserved: 2048,
		VCPUOvercommit:     4,
		InitTimeout:        Seconds(2 * time.Minute),
		ProgramSnapshots:   true,

		MaxRequestBody:     1 << 30,
		ConsoleLogMaxSize:  4 << 20,
		MaxPublishedPorts:  64,
		HTTPHeaderTimeout:  Seconds(30 * time.Second),
		HTTPReadTimeout:    Seconds(time.Minute),
		HTTPWriteTimeout:   Seconds(time.Minute),
		HTTPIdleTimeout:    Seconds(2 * time.Minute),
		HTTPMaxConnections: 4096,
		LogsMaxFollowers:   256,
		LogsMaxFollowersVM: 20,
		AllocationMaxAge:   Seconds(300 * time.Second),
		LogLevel:           "info",
		LogFormat:          "text",
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
	if c.StallTimeout <= 0 {
		errs = append(errs, fmt.Errorf("%sDOWNLOAD_STALL_TIMEOUT: must be positive", EnvPrefix))
	}
	if c.MaxItemSize <= 0 {
		errs = append(errs, fmt.Errorf("%sSTORE_MAX_ITEM_SIZE: must be positive", EnvPrefix))
	}
	if c.LayerMaxDepth < 1 || c.LayerMaxDepth > 64 {
		errs = append(errs, fmt.Errorf("%sLAYER_MAX_DEPTH: must be between 1 and 64, got %d", EnvPrefix, c.LayerMaxDepth))
	}
	if c.PartMaxAge <= 0 {
		errs = append(errs, fmt.Errorf("%sDOWNLOAD_PART_MAX_AGE: must be positive", EnvPrefix))
	}
	if c.MessageMaxAge <= 0 {
		errs = append(errs, fmt.Errorf("%sSTORE_MESSAGE_MAX_AGE: must be positive", EnvPrefix))
	}
	if p, err := netip.ParsePrefix(c.IPv4AddressPool); err != nil || !p.Addr().Is4() {
		errs = append(errs, fmt.Errorf("%sIPV4_ADDRESS_POOL: want an IPv4 prefix such as 172.16.0.0/12, got %q", EnvPrefix, c.IPv4AddressPool))
	} else if c.IPv4PrefixLength < p.Bits() || c.IPv4PrefixLength > 30 {
		errs = append(errs, fmt.Errorf("%sIPV4_NETWORK_PREFIX_LENGTH: must be between %d and 30, got %d", EnvPrefix, p.Bits(), c.IPv4PrefixLength))
	}
	if c.IPv6AddressPool != "" {
		if p, err := netip.ParsePrefix(c.IPv6AddressPool); err != nil || !p.Addr().Is6() || p.Bits() > 64 {
			errs = append(errs, fmt.Errorf("%sIPV6_ADDRESS_POOL: want an IPv6 prefix of /64 or larger, got %q", EnvPrefix, c.IPv6AddressPool))
		}
	}
	for _, a := range c.DNSNameservers {
		if _, err := netip.ParseAddr(a); err != nil {
			errs = append(errs, fmt.Errorf("%sDNS_NAMESERVERS: %q is not an IP address", EnvPrefix, a))
		}
	}
	if _, err := c.GuestAllowedPrefixes(); err != nil {
		errs = append(errs, fmt.Errorf("%sGUEST_ALLOWED_NETWORKS: %w", EnvPrefix, err))
	}
	switch c.QEMUAccel {
	case "auto", "kvm", "tcg":
	default:
		errs = append(errs, fmt.Errorf("%sQEMU_ACCEL: must be auto, kvm or tcg, got %q", EnvPrefix, c.QEMUAccel))
	}
	if c.InstanceHypervisor != "qemu" && c.InstanceHypervisor != "firecracker" {
		errs = append(errs, fmt.Errorf("%sINSTANCE_DEFAULT_HYPERVISOR: must be qemu or firecracker, got %q", EnvPrefix, c.InstanceHypervisor))
	}
	switch c.ProgramHypervisor {
	case "auto", "qemu", "firecracker":
	default:
		errs = append(errs, fmt.Errorf("%sPROGRAM_HYPERVISOR: must be auto, qemu or firecracker, got %q", EnvPrefix, c.ProgramHypervisor))
	}
	for _, h := range c.Hypervisors {
		if h != "qemu" && h != "firecracker" {
			errs = append(errs, fmt.Errorf("%sHYPERVISORS: %q is neither qemu nor firecracker", EnvPrefix, h))
		}
	}
	if c.JailerFirstUID < 1 || c.JailerFirstUID > math.MaxUint32-65536 {
		errs = append(errs, fmt.Errorf("%sJAILER_FIRST_UID: must be between 1 and %d, got %d", EnvPrefix, math.MaxUint32-65536, c.JailerFirstUID))
	}
	if c.QEMUFirstUID < 1 || c.QEMUFirstUID > math.MaxUint32-65536-1 {
		errs = append(errs, fmt.Errorf("%sQEMU_FIRST_UID: must be between 1 and %d, got %d", EnvPrefix, math.MaxUint32-65536-1, c.QEMUFirstUID))
	} else if c.QEMUFirstUID < c.JailerFirstUID+65536 && c.JailerFirstUID < c.QEMUFirstUID+65536 {
		errs = append(errs, fmt.Errorf("%sQEMU_FIRST_UID: the QEMU uids %d-%d overlap the jailer's %d-%d (JAILER_FIRST_UID)", EnvPrefix,
			c.QEMUFirstUID, c.QEMUFirstUID+65535, c.JailerFirstUID, c.JailerFirstUID+65535))
	}
	if c.QEMURunAs == "0" || strings.HasPrefix(c.QEMURunAs, "0:") {
		errs = append(errs, fmt.Errorf("%sQEMU_RUNAS: uid 0 is root: say root to run QEMU as root", EnvPrefix))
	}
	if c.JailerBaseDirectory != "" && !strings.HasPrefix(c.JailerBaseDirectory, "/") {
		errs = append(errs, fmt.Errorf("%sJAILER_BASE_DIRECTORY: must be an absolute path, got %q", EnvPrefix, c.JailerBaseDirectory))
	}
	if c.VCPUOvercommit <= 0 {
		errs = append(errs, fmt.Errorf("%sVCPU_OVERCOMMIT_FACTOR: must be positive", EnvPrefix))
	}
	if c.BackupsPerVM < 1 {
		errs = append(errs, fmt.Errorf("%sBACKUPS_PER_VM: must be at least 1, got %d", EnvPrefix, c.BackupsPerVM))
	}
	if c.BackupCompression != "zstd" && c.BackupCompression != "zlib" {
		errs = append(errs, fmt.Errorf("%sBACKUP_COMPRESSION: zstd or zlib, got %q", EnvPrefix, c.BackupCompression))
	}
	if c.BackupMaxAge <= 0 || c.MaxRestoreUpload <= 0 {
		errs = append(errs, fmt.Errorf("%sBACKUP_MAX_AGE and %sMAX_RESTORE_UPLOAD_BYTES: must be positive", EnvPrefix, EnvPrefix))
	}
	if c.ConsoleLogMaxSize < 64<<10 {
		errs = append(errs, fmt.Errorf("%sCONSOLE_LOG_MAX_SIZE: must be at least 64KiB, got %s", EnvPrefix, c.ConsoleLogMaxSize))
	}
	if c.MaxPublishedPorts < 1 || c.MaxPublishedPorts > 65535 {
		errs = append(errs, fmt.Errorf("%sMAX_PUBLISHED_PORTS: must be between 1 and 65535, got %d", EnvPrefix, c.MaxPublishedPorts))
	}
	for _, t := range []struct {
		name  string
		value Seconds
	}{{"HTTP_HEADER_TIMEOUT", c.HTTPHeaderTimeout}, {"HTTP_READ_TIMEOUT", c.HTTPReadTimeout}, {"HTTP_WRITE_TIMEOUT", c.HTTPWriteTimeout}, {"HTTP_IDLE_TIMEOUT", c.HTTPIdleTimeout}} {
		if t.value <= 0 {
			errs = append(errs, fmt.Errorf("%s%s: must be positive", EnvPrefix, t.name))
		}
	}
	if c.LogsMaxFollowers < 1 || c.LogsMaxFollowersVM < 1 {
		errs = append(errs, fmt.Errorf("%sLOGS_MAX_FOLLOWERS and %sLOGS_MAX_FOLLOWERS_PER_VM: must be at least 1", EnvPrefix, EnvPrefix))
	}
	if c.HTTPMaxConnections <= c.LogsMaxFollowers {
		errs = append(errs, fmt.Errorf("%sHTTP_MAX_CONNECTIONS: must be more than LOGS_MAX_FOLLOWERS (%d), so that followers never take every connection, got %d", EnvPrefix, c.LogsMaxFollowers, c.HTTPMaxConnections))
	}
	for _, o := range c.WebsocketOrigins {
		if _, err := path.Match(o, ""); err != nil || o == "*" {
			errs = append(errs, fmt.Errorf("%sWEBSOCKET_ALLOWED_ORIGINS: %q is not a host pattern (and * would let every site in)", EnvPrefix, o))
		}
	}
	for _, t := range []struct {
		name  string
		value Seconds
	}{{"INIT_TIMEOUT", c.InitTimeout}, {"ALLOCATION_SIGNATURE_MAX_AGE_SECONDS", c.AllocationMaxAge}} {
		if t.value <= 0 {
			errs = append(errs, fmt.Errorf("%s%s: must be positive", EnvPrefix, t.name))
		}
	}
	if c.MaxRequestBody <= 0 {
		errs = append(errs, fmt.Errorf("%sMAX_REQUEST_BODY: must be positive", EnvPrefix))
	}
	if c.ReuseTimeout < 0 {
		errs = append(errs, fmt.Errorf("%sREUSE_TIMEOUT: must not be negative", EnvPrefix))
	}
	for _, dir := range []struct{ name, value string }{{"EXECUTION_ROOT", c.ExecutionRoot}, {"CACHE_ROOT", c.CacheRoot}, {"ASSETS_DIR", c.Assets()}} {
		if !strings.HasPrefix(dir.value, "/") {
			errs = append(errs, fmt.Errorf("%s%s: must be an absolute path, got %q", EnvPrefix, dir.name, dir.value))
		}
	}
	errs = append(errs, c.validateDiagnostic()...)
	return errors.Join(errs...)
}

// validateDiagnostic checks the settings of the diagnostic program and
// of the guest API it uses.
func (c Config) validateDiagnostic() []error {
	var errs []error
	for _, b := range []struct {
		name  string
		value int64
	}{{"GUEST_CACHE_MAX_VALUE_SIZE", int64(c.GuestCacheMaxValue)}, {"GUEST_CACHE_MAX_KEYS", int64(c.GuestCacheMaxKeys)}, {"GUEST_CACHE_MAX_SIZE", int64(c.GuestCacheMaxSize)}} {
		if b.value <= 0 {
			errs = append(errs, fmt.Errorf("%s%s: must be positive", EnvPrefix, b.name))
		}
	}
	for _, ref := range []struct{ name, value string }{
		{"NODE_HASH", c.NodeHash}, {"CHECK_FASTAPI_VM_ID", c.CheckFastAPIVMID}, {"LEGACY_CHECK_FASTAPI_VM_ID", c.LegacyCheckVMID}, {"DIAGNOSTIC_MESSAGE", c.DiagnosticMessage},
	} {
		if _, err := message.ParseItemHash(ref.value); ref.value != "" && err != nil {
			errs = append(errs, fmt.Errorf("%s%s: %w", EnvPrefix, ref.name, err))
		}
	}
	for _, list := range []struct {
		name string
		urls List
	}{{"DIAGNOSTIC_IPV4_URLS", c.DiagnosticIPv4URLs}, {"DIAGNOSTIC_IPV6_URLS", c.DiagnosticIPv6URLs}, {"DIAGNOSTIC_INTERNET_URLS", c.DiagnosticWebURLs}} {
		for _, u := range list.urls {
			if p, err := url.Parse(u); err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" || strings.Contains(u, ",") {
				errs = append(errs, fmt.Errorf("%s%s: want http or https URLs without commas, got %q", EnvPrefix, list.name, u))
			}
		}
	}
	return errs
}

// GuestAllowedPrefixes returns GUEST_ALLOWED_NETWORKS as prefixes; an
// address stands for itself alone.
func (c Config) GuestAllowedPrefixes() ([]netip.Prefix, error) {
	var out []netip.Prefix
	var errs []error
	for _, s := range c.GuestAllowedNets {
		var p netip.Prefix
		var err error
		if strings.Contains(s, "/") {
			p, err = netip.ParsePrefix(s)
		} else {
			var a netip.Addr
			if a, err = netip.ParseAddr(s); err == nil && a.Zone() == "" {
				p = netip.PrefixFrom(a, a.BitLen())
			}
		}
		switch {
		case err != nil || !p.IsValid():
			errs = append(errs, fmt.Errorf("%q is not a network such as 10.1.2.0/24 or fd00:1::/64, nor an address", s))
		case p.Addr().Is4In6():
			errs = append(errs, fmt.Errorf("%q: write an IPv4 network as such (%s)", s, netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0)).Masked()))
		case p != p.Masked():
			errs = append(errs, fmt.Errorf("%q has bits set past its length: %s?", s, p.Masked()))
		case p.Bits() == 0:
			errs = append(errs, fmt.Errorf("%q allows every address, the cloud's metadata service and the host's own networks included: list the networks themselves", s))
		default:
			out = append(out, p)
		}
	}
	return out, errors.Join(errs...)
}

// Backups is the backups directory: BACKUP_DIRECTORY, else
// <EXECUTION_ROOT>/backups.
func (c Config) Backups() string {
	if c.BackupDirectory != "" {
		return c.BackupDirectory
	}
	return filepath.Join(c.ExecutionRoot, "backups")
}

// JailerBase returns the jailer's chroot base directory.
func (c Config) JailerBase() string {
	if c.JailerBaseDirectory != "" {
		return c.JailerBaseDirectory
	}
	return filepath.Join(c.ExecutionRoot, "jail")
}

// Assets is the assets directory: ASSETS_DIR, else <CACHE_ROOT>/assets.
func (c Config) Assets() string {
	if c.AssetsDir != "" {
		return c.AssetsDir
	}
	return filepath.Join(c.CacheRoot, "assets")
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
	if f, err := strconv.ParseFloat(text, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		// NaN, the infinities and more than a time.Duration holds (292
		// years) would convert to whatever the CPU makes of them.
		if d := f * float64(time.Second); err != nil || math.IsNaN(d) || math.Abs(d) >= math.MaxInt64 {
			return fmt.Errorf("want a finite number of seconds, at most %d, got %q", int64(math.MaxInt64/time.Second), text)
		}
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

// Bytes is a size written as a number of bytes or with a unit: "50GiB",
// "500MB", "1.5G" (a bare K, M, G or T is binary, as in 1.5G = 1.5 GiB).
type Bytes int64

var byteUnits = []struct {
	suffix string
	factor float64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"kB", 1e3}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1},
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (b *Bytes) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	factor := 1.0
	for _, u := range byteUnits {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			s, factor = strings.TrimSpace(num), u.factor
			break
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	// Written so that NaN fails too; float64(math.MaxInt64) is 2^63,
	// which an int64 does not hold.
	if err != nil || !(f >= 0) || f*factor >= math.MaxInt64 {
		return fmt.Errorf("want a size such as 50GiB, 500MB or 1073741824, got %q", text)
	}
	*b = Bytes(f * factor)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (b Bytes) MarshalText() ([]byte, error) { return []byte(b.String()), nil }

// String formats the size in the largest binary unit that divides it.
func (b Bytes) String() string {
	for _, u := range []struct {
		suffix string
		factor int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if b != 0 && int64(b)%u.factor == 0 {
			return strconv.FormatInt(int64(b)/u.factor, 10) + u.suffix
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// Human formats the size for people, rounded to one decimal: "1.5 GiB".
func (b Bytes) Human() string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	f, i := float64(b), 0
	for ; f >= 1024 && i < len(units)-1; i++ {
		f /= 1024
	}
	if i == 0 {
		return fmt.Sprintf("%d B", int64(b))
	}
	return fmt.Sprintf("%.1f %s", f, units[i])
}

// List is a list of strings, written as a JSON list (as the reference
// writes them: '["a", "b"]') or separated by commas.
type List []string

// UnmarshalText implements encoding.TextUnmarshaler.
func (l *List) UnmarshalText(b []byte) error {
	text := strings.TrimSpace(string(b))
	if strings.HasPrefix(text, "[") {
		var out []string
		if err := json.Unmarshal([]byte(text), &out); err != nil {
			return fmt.Errorf("want a JSON list of strings: %w", err)
		}
		*l = out
		return nil
	}
	*l = nil
	for _, part := range strings.Split(text, ",") {
		if part = strings.TrimSpace(part); part != "" {
			*l = append(*l, part)
		}
	}
	return nil
}

// UnmarshalYAML takes a YAML sequence or a string.
func (l *List) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.SequenceNode {
		var out []string
		if err := n.Decode(&out); err != nil {
			return err
		}
		*l = out
		return nil
	}
	return l.UnmarshalText([]byte(n.Value))
}

// String formats the list as JSON.
func (l List) String() string {
	if len(l) == 0 {
		return ""
	}
	b, _ := json.Marshal([]string(l))
	return string(b)
}

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

// Example is a config file that lists every setting with its default and
// its help, each setting commented out: the file the Debian package
// installs as DefaultFile. Uncommenting a setting's line sets it to its
// default; changing the value there sets it.
func Example() string {
	var b strings.Builder
	b.WriteString(`# alephvm node settings (YAML).
#
# Every setting is listed below with its default value, commented out:
# uncomment its line and change the value to set it. Each setting also has an
# environment variable (named below; for the service, /etc/default/alephvm can
# set them) and a flag (the variable's name after ALEPH_VM_, in lower case with
# dashes), which override this file. "alephvm config show" prints the
# effective settings and where each came from; "alephvm config doc" prints
# this reference as a table.
`)
	def := reflect.ValueOf(Default())
	for _, s := range Settings() {
		b.WriteString("\n")
		for _, line := range wrap(s.Help, 76) {
			b.WriteString("# " + line + "\n")
		}
		fmt.Fprintf(&b, "# Environment: %s\n", s.Env)
		line := fmt.Sprintf("#%s: %s", s.YAML, yamlScalar(def.Field(s.field)))
		if list, ok := def.Field(s.field).Interface().(List); ok && len(line) > 80 {
			// A long list, as a block sequence: one item a line.
			line = "#" + s.YAML + ":"
			for _, item := range list {
				line += "\n#  - " + yamlScalar(reflect.ValueOf(item))
			}
		}
		b.WriteString(line + "\n")
	}
	return b.String()
}

// yamlScalar writes a setting's value as it reads back from YAML: lists as
// flow sequences, strings quoted where YAML needs it, and everything else
// (numbers, booleans, sizes, durations) as its text form, which the
// setting's type parses.
func yamlScalar(v reflect.Value) string {
	switch x := v.Interface().(type) {
	case List:
		if len(x) == 0 {
			return "[]"
		}
		return x.String()
	case string:
		out, err := yaml.Marshal(x)
		if err != nil {
			return strconv.Quote(x)
		}
		return strings.TrimSuffix(string(out), "\n")
	}
	return formatValue(v)
}

// wrap splits text into lines of at most width characters, at spaces.
func wrap(text string, width int) []string {
	var lines []string
	line := ""
	for _, word := range strings.Fields(text) {
		if line != "" && len(line)+1+len(word) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += word
	}
	if line != "" {
		lines = append(lines, line)
	}
	return lines
}
