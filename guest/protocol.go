package guest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
	"unicode/utf8"
)

// ProtocolVersion is the version of the control protocol; the guest
// reports it in its hello.
const ProtocolVersion = 1

// The control channel: a virtio-serial port of this name under QEMU
// (exposed on the host as a unix socket chardev), or this vsock port under
// Firecracker (reached on the host through Firecracker's vsock unix socket
// with "CONNECT <port>\n").
const (
	ControlPortName  = "org.alephvm.control"
	ControlVsockPort = 52
)

// KernelCmdline is the kernel command line the init expects: the console
// on the first serial port, quiet (console output is slow under
// emulation), a reboot instead of a hang if the init dies, and no crypto
// self-tests at boot (the kernel's test of every built-in algorithm, most
// of the cloud kernel's boot time under emulation). Hypervisor backends
// append their own arguments (Firecracker: pci=off).
const KernelCmdline = "console=ttyS0 quiet panic=1 reboot=k cryptomgr.notests"

// State is where the workload is in its life.
type State string

// The workload states.
const (
	StateStarting State = "starting" // the init is setting up; no workload yet
	StateRunning  State = "running"  // started, port 8080 not accepting yet
	StateReady    State = "ready"    // port 8080 accepts connections
	StateExited   State = "exited"   // the workload ended; ExitCode says how
	StateFailed   State = "failed"   // the init could not start the workload; Error says why
	StateHalting  State = "halting"  // a halt is under way
	// StateWaiting: a template's init, every driver loaded, waits for a
	// resume (a VM restored from the template) before it reads any config.
	StateWaiting State = "waiting"
)

// TemplateFlag on the kernel command line makes the init boot as a
// template: it loads every driver and filesystem, reports StateWaiting and
// waits for a resume before it touches anything program-specific.
const TemplateFlag = "alephvm.template"

// ResumeRequest is what a VM restored from a template gets before it
// carries on as after a boot: the host's wall clock (the template's is as
// old as the template) and entropy of its own (its kernel pool is the
// template's, shared with every VM restored from it).
type ResumeRequest struct {
	Time time.Time `json:"time"`
	Seed []byte    `json:"seed"`
	// Network is the VM's own network, for a VM restored from a program's
	// snapshot: its workload already runs, and its NIC is new.
	Network *Network `json:"network,omitempty"`
}

// MinResumeSeed is the least seed a resume carries: 256 bits.
const MinResumeSeed = 32

// Status is the init's view of the workload.
type Status struct {
	State State `json:"state"`
	PID   int   `json:"pid,omitempty"`
	// ExitCode is set once the workload has exited: its exit status, or
	// 128 + the signal that killed it.
	ExitCode  *int   `json:"exit_code,omitempty"`
	Signal    int    `json:"signal,omitempty"`     // the signal that killed it, if any
	OOMKilled bool   `json:"oom_killed,omitempty"` // the kernel's OOM killer killed a workload process
	Error     string `json:"error,omitempty"`
	Boot      Boot   `json:"boot"`
	// Seq numbers the statuses an init reports: each one it computes has
	// a higher Seq than those before. A host can receive two out of order
	// (an answer to Status computed just before an event, written just
	// after it), and keeps the later. Zero from an init that does not
	// number them.
	Seq uint64 `json:"seq,omitempty"`
}

// Boot records when each step of the boot ended, as time since the kernel
// started (the guest's CLOCK_BOOTTIME, which does not include firmware and
// kernel decompression). Zero means not reached. The init's own share of a
// boot is Started - Kernel - ModuleWait.
type Boot struct {
	Kernel    time.Duration `json:"kernel"`     // the kernel ran /init (from the kernel log)
	InitStart time.Duration `json:"init_start"` // the init's main function began
	Modules   time.Duration `json:"modules"`    // device drivers loaded, devices present
	Config    time.Duration `json:"config"`     // config drive read
	Mounts    time.Duration `json:"mounts"`     // root switched, every drive mounted
	Network   time.Duration `json:"network"`    // hostname and eth0 configured
	Started   time.Duration `json:"started"`    // workload process started
	Ready     time.Duration `json:"ready"`      // port 8080 accepting
	Control   time.Duration `json:"control"`    // control channel open (concurrent with the rest)
	// Resume is when a VM restored from a template was resumed; the steps
	// before it are the template's own boot.
	Resume time.Duration `json:"resume,omitempty"`
	// ModuleWait is the time the boot spent waiting for kernel modules to
	// load (finit_module, which includes the drivers probing devices).
	ModuleWait time.Duration `json:"module_wait"`
}

// EventType names an asynchronous event from the guest.
type EventType string

// The events.
const (
	EventReady  EventType = "ready"  // the workload accepts connections on port 8080
	EventExited EventType = "exited" // the workload ended (Status.ExitCode, Status.OOMKilled)
	EventOOM    EventType = "oom"    // the OOM killer killed a process of the workload
	EventFailed EventType = "failed" // the workload could not be started (Status.Error)
)

// Event is an asynchronous notice from the guest, with the status at that
// moment.
type Event struct {
	Type   EventType `json:"type"`
	Status Status    `json:"status"`
}

// QueueEvent queues ev on ch; when ch is full its oldest event is
// dropped, so that the last event queued holds the latest state (an exit
// after a storm of OOM events). The caller must be ch's only sender:
// once one event is taken out, ev fits.
func QueueEvent(ch chan Event, ev Event) {
	select {
	case ch <- ev:
		return
	default:
	}
	select {
	case <-ch:
	default:
	}
	select {
	case ch <- ev:
	default:
	}
}

// Stream names where a log line was written.
type Stream string

// The workload's output streams.
const (
	Stdout Stream = "stdout"
	Stderr Stream = "stderr"
)

// LogLine is one line of the workload's output.
type LogLine struct {
	Seq    uint64    `json:"seq"` // increasing from 1 over the VM's life
	Time   time.Time `json:"time"`
	Stream Stream    `json:"stream"`
	Text   string    `json:"text"` // without the newline
}

// ExecRequest runs a command in the guest.
type ExecRequest struct {
	Argv []string          `json:"argv"`
	Env  map[string]string `json:"env,omitempty"` // added to the workload's environment
	// User runs the command: empty for the workload's user, or a name or
	// uid[:gid] ("root" included).
	User    string        `json:"user,omitempty"`
	Dir     string        `json:"dir,omitempty"` // default /opt/code
	Stdin   []byte        `json:"stdin,omitempty"`
	Timeout time.Duration `json:"timeout,omitempty"` // default 60 s; the command is killed after it
}

// MaxExecOutput caps each of an exec's stdout and stderr.
const MaxExecOutput = 1 << 20

// ExecResult is how an exec'd command ended.
type ExecResult struct {
	ExitCode  int    `json:"exit_code"`        // exit status, or 128 + signal
	Signal    int    `json:"signal,omitempty"` // the signal that killed it, if any
	Stdout    []byte `json:"stdout"`
	Stderr    []byte `json:"stderr"`
	Truncated bool   `json:"truncated,omitempty"` // an output exceeded MaxExecOutput
	TimedOut  bool   `json:"timed_out,omitempty"`
}

// Sysinfo is a snapshot of the guest's resources.
type Sysinfo struct {
	Uptime       time.Duration `json:"uptime"`
	Load         [3]float64    `json:"load"`
	CPUs         int           `json:"cpus"`
	MemTotal     uint64        `json:"mem_total"` // bytes
	MemAvailable uint64        `json:"mem_available"`
	Processes    int           `json:"processes"`
	Zombies      int           `json:"zombies"`
	Mounts       []MountUsage  `json:"mounts"`
	Network      []NetCounters `json:"network,omitempty"`
}

// MountUsage is the use of one mounted filesystem.
type MountUsage struct {
	Path      string `json:"path"`
	Total     uint64 `json:"total"` // bytes
	Available uint64 `json:"available"`
}

// NetCounters are an interface's traffic counters.
type NetCounters struct {
	Interface string `json:"interface"`
	RxBytes   uint64 `json:"rx_bytes"`
	TxBytes   uint64 `json:"tx_bytes"`
}

// Hello is the guest's answer to the hello that opens a session.
type Hello struct {
	Protocol    int    `json:"protocol"`
	InitVersion string `json:"init_version"`
	Status      Status `json:"status"`
}

// The operations of the protocol.
const (
	opHello   = "hello"
	opStatus  = "status"
	opLogs    = "logs"
	opSignal  = "signal"
	opExec    = "exec"
	opSysinfo = "sysinfo"
	opHalt    = "halt"
	opCancel  = "cancel"
	// The guest API (api.go): the host's long call that receives the
	// workload's calls, and its answer to one of them.
	opAPI      = "api"
	opAPIReply = "api_reply"
	// A message the workload subscribed to (Client.DeliverEvent).
	opEvent = "event"
	// The resume of a VM restored from a template (ResumeRequest).
	opResume = "resume"
)

// request is one line from the host.
type request struct {
	ID     uint64         `json:"id"`
	Op     string         `json:"op"`
	Follow bool           `json:"follow,omitempty"` // logs
	Signal int            `json:"signal,omitempty"` // signal
	Exec   *ExecRequest   `json:"exec,omitempty"`   // exec
	Target uint64         `json:"target,omitempty"` // cancel
	Answer *APIAnswer     `json:"answer,omitempty"` // api_reply
	Body   []byte         `json:"body,omitempty"`   // event
	Resume *ResumeRequest `json:"resume,omitempty"` // resume
}

// reply is one line from the guest: a reply to request ID (the last one
// has Done set), or an event when ID is 0.
type reply struct {
	ID      uint64      `json:"id,omitempty"`
	Done    bool        `json:"done,omitempty"`
	Error   string      `json:"error,omitempty"`
	Hello   *Hello      `json:"hello,omitempty"`
	Status  *Status     `json:"status,omitempty"`
	Log     *LogLine    `json:"log,omitempty"`
	Exec    *ExecResult `json:"exec,omitempty"`
	Sysinfo *Sysinfo    `json:"sysinfo,omitempty"`
	Event   *Event      `json:"event,omitempty"`
	API     *APICall    `json:"api,omitempty"` // a call of the workload, on the host's api call
}

// Bounds of the protocol. The host treats everything the guest sends as
// hostile: a line past maxLine ends the session (ErrProtocol), and the
// client cuts or refuses values past the others, so that a guest cannot
// make the node hold more than a few MiB for it.
const (
	// maxLine bounds one line in either direction. The largest legitimate
	// line is an exec reply: two outputs of MaxExecOutput bytes, base64.
	maxLine = 4 << 20
	// MaxExecInput caps an exec's stdin.
	MaxExecInput = 1 << 20
	// MaxLogText caps LogLine.Text; the host cuts longer texts (the init
	// splits lines at 16 KiB, which invalid UTF-8 may triple).
	MaxLogText = 64 << 10
	// MaxErrorText caps the error of a reply and Status.Error; the host
	// cuts longer ones.
	MaxErrorText = 4 << 10
	// maxVersionText caps Hello.InitVersion.
	maxVersionText = 256
	// maxWordText caps the words of the protocol a guest sends: a
	// Status.State and an Event.Type.
	maxWordText = 64
	// maxSysinfoEntries caps Sysinfo.Mounts and Sysinfo.Network, and
	// maxSysinfoName each path or interface name in them.
	maxSysinfoEntries = 1024
	maxSysinfoName    = 4096
)

// ErrProtocol is wrapped by the errors of a guest that breaks the
// protocol's bounds.
var ErrProtocol = errors.New("guest protocol violation")

// lineReader reads the protocol's lines.
type lineReader struct {
	br  *bufio.Reader
	buf []byte
}

func newLineReader(r io.Reader) *lineReader {
	return &lineReader{br: bufio.NewReaderSize(r, 64<<10)}
}

// next returns the next line without its newline, valid until the next
// call. A line longer than maxLine is an ErrProtocol error: its end is not
// looked for. A partial last line is dropped (io.EOF).
func (lr *lineReader) next() ([]byte, error) {
	if cap(lr.buf) > 1<<20 {
		lr.buf = nil // do not keep a huge line's buffer for the session's life
	}
	line := lr.buf[:0]
	for {
		chunk, err := lr.br.ReadSlice('\n')
		if len(line)+len(chunk) > maxLine {
			return nil, fmt.Errorf("%w: a line longer than %d bytes", ErrProtocol, maxLine)
		}
		line = append(line, chunk...)
		lr.buf = line
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			return nil, io.EOF
		default:
			return nil, err
		}
	}
}

// cut returns s cut to at most n bytes, on a rune boundary, copied so that
// it does not keep a larger decoded line alive.
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := n
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return strings.Clone(s[:i])
}
