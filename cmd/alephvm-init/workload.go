package main

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/alephvm/alephvm/guest"
)

// The cgroups of the workload and of exec'd commands, so that an OOM kill
// is told apart.
const (
	cgroupRoot     = "/sys/fs/cgroup"
	workloadCgroup = cgroupRoot + "/workload"
	execCgroup     = cgroupRoot + "/exec"
)

const codeDir = "/opt/code"

// readyPoll is how often the init tries port 8080 until it accepts.
const readyPoll = 10 * time.Millisecond

// workloadArgv returns the command line of the workload. An ASGI program
// that takes events runs under the event wrapper (eventWrapper), its own
// app given in ALEPHVM_ASGI_APP (workloadEnv).
func workloadArgv(w guest.Workload, plain bool) []string {
	if w.Interface == guest.InterfaceASGI {
		app := workloadApp(w, plain)
		if w.Events {
			app = "alephvm_events:app"
		}
		return []string{"python3", "-m", "uvicorn", "--app-dir", codeDir, "--host", "0.0.0.0", "--port", strconv.Itoa(guest.Port), app}
	}
	return append([]string{filepath.Join(codeDir, w.Entrypoint)}, w.Args...)
}

// workloadApp is the program's own ASGI app, module:attribute.
func workloadApp(w guest.Workload, plain bool) string {
	if plain {
		return guest.PlainCodeModule + ":" + w.Entrypoint
	}
	return w.Entrypoint
}

// The event wrapper: its module, where the init writes it, and the socket
// on which it takes events, in a directory of the workload's user.
const (
	eventWrapperDir = "/opt/alephvm"
	eventSocketDir  = "/run/alephvm-events"
	eventSocket     = eventSocketDir + "/events.sock"
)

//go:embed alephvm_events.py
var eventWrapper []byte

// setupEvents writes the event wrapper and makes its socket's directory,
// the workload's user's alone.
func (in *Init) setupEvents() error {
	if err := os.MkdirAll(eventWrapperDir, 0o755); err != nil {
		return fmt.Errorf("event wrapper: %w", err)
	}
	if err := os.WriteFile(filepath.Join(eventWrapperDir, "alephvm_events.py"), eventWrapper, 0o644); err != nil {
		return fmt.Errorf("event wrapper: %w", err)
	}
	if err := os.MkdirAll(eventSocketDir, 0o700); err != nil {
		return fmt.Errorf("event socket: %w", err)
	}
	if err := os.Chown(eventSocketDir, in.user.uid, in.user.gid); err != nil {
		return fmt.Errorf("event socket: %w", err)
	}
	return nil
}

// DeliverEvent implements guest.EventAgent: the message goes to the
// wrapper's socket, length first, and the wrapper answers once the app has
// taken it.
func (in *Init) DeliverEvent(ctx context.Context, body []byte) error {
	if !in.cfg.Workload.Events || in.cfg.Workload.Interface != guest.InterfaceASGI {
		return errors.New("the program takes no events (no on.message subscription, or not an ASGI app)")
	}
	return deliverTo(ctx, eventSocket, body)
}

// deliverTo delivers an event to the wrapper listening on sock.
func deliverTo(ctx context.Context, sock string, body []byte) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return fmt.Errorf("the program's event socket: %w", err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	frame := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	if _, err := conn.Write(append(frame, body...)); err != nil {
		return fmt.Errorf("deliver the event: %w", err)
	}
	answer, err := bufio.NewReader(io.LimitReader(conn, 4096)).ReadString('\n')
	if err != nil && answer == "" {
		return fmt.Errorf("the program's answer to the event: %w", err)
	}
	if answer = strings.TrimSpace(answer); answer != "ok" {
		return fmt.Errorf("the program failed the event: %s", answer)
	}
	return nil
}

// workloadEnv returns the workload's environment: the basics, then the
// message's variables, which may override them.
func workloadEnv(u user, hostname string, vars map[string]string) []string {
	env := map[string]string{
		"PATH":             "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME":             u.home,
		"USER":             u.name,
		"LOGNAME":          u.name,
		"HOSTNAME":         hostname,
		"LANG":             "C.UTF-8",
		"PYTHONPATH":       "/opt/packages",
		"PYTHONUNBUFFERED": "1",
		// The Aleph SDK reaches the guest API (the node) on the init's
		// socket, as under the reference's runtime.
		"ALEPH_API_HOST":                  "http://localhost",
		"ALEPH_API_UNIX_SOCKET":           guest.APISocket,
		"ALEPH_REMOTE_CRYPTO_HOST":        "http://localhost",
		"ALEPH_REMOTE_CRYPTO_UNIX_SOCKET": guest.APISocket,
		"ALEPH_ADDRESS_TO_USE":            hostname,
	}
	maps.Copy(env, vars)
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}

// setupCgroups creates the workload's and exec's cgroups with the memory
// controller, whose oom_kill count tells an OOM kill.
func setupCgroups() error {
	if err := os.WriteFile(cgroupRoot+"/cgroup.subtree_control", []byte("+memory +pids"), 0); err != nil {
		return fmt.Errorf("enable cgroup controllers: %w", err)
	}
	for _, dir := range []string{workloadCgroup, execCgroup} {
		if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
			return err
		}
	}
	return nil
}

// oomKills reads the oom_kill count of a cgroup.
func oomKills(cgroup string) uint64 {
	b, err := os.ReadFile(cgroup + "/memory.events")
	if err != nil {
		return 0
	}
	return parseOOMKills(b)
}

func parseOOMKills(memoryEvents []byte) uint64 {
	sc := bufio.NewScanner(bytes.NewReader(memoryEvents))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "oom_kill "); ok {
			n, _ := strconv.ParseUint(v, 10, 64)
			return n
		}
	}
	return 0
}

// command builds a command run as u, in its own process group.
func command(argv, env []string, dir string, u user) *exec.Cmd {
	cmd := &exec.Cmd{Path: argv[0], Args: argv, Env: env, Dir: dir}
	if !strings.Contains(argv[0], "/") {
		if p, err := lookPath(argv[0], env); err == nil {
			cmd.Path = p
		}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:    true,
		Credential: &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid), Groups: []uint32{}},
	}
	return cmd
}

// startPiped starts cmd in the cgroup (when it exists) with its stdout and
// stderr on pipes, and returns its exit status channel and the pipes'
// read ends.
func (in *Init) startPiped(cmd *exec.Cmd, cgroup string) (wait <-chan unix.WaitStatus, stdout, stderr *os.File, err error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, nil, nil, err
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	if dir, err := os.Open(cgroup); err == nil {
		defer dir.Close()
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(dir.Fd())
	}
	wait, err = in.reaper.start(cmd)
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, nil, nil, fmt.Errorf("start %s: %w", cmd.Args[0], err)
	}
	return wait, outR, errR, nil
}

// lookPath finds file in the PATH of env.
func lookPath(file string, env []string) (string, error) {
	for _, kv := range env {
		if p, ok := strings.CutPrefix(kv, "PATH="); ok {
			for _, dir := range filepath.SplitList(p) {
				path := filepath.Join(dir, file)
				if st, err := os.Stat(path); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
					return path, nil
				}
			}
		}
	}
	return "", fmt.Errorf("%s: not found in PATH", file)
}

// startWorkload starts the program and the goroutines that watch it.
func (in *Init) startWorkload() error {
	if err := setupCgroups(); err != nil {
		logf("%v (OOM kills will not be reported)", err)
	}
	w := in.cfg.Workload
	plain := false
	for _, d := range in.cfg.Drives {
		plain = plain || (d.Role == guest.RoleCode && d.Format == guest.FormatFile)
	}
	argv := workloadArgv(w, plain)
	in.serveAPI()
	env := workloadEnv(in.user, in.cfg.Hostname, w.Variables)
	if w.Events && w.Interface == guest.InterfaceASGI {
		if err := in.setupEvents(); err != nil {
			return err
		}
		env = append(env, "ALEPHVM_ASGI_APP="+workloadApp(w, plain), "ALEPHVM_EVENTS_SOCKET="+eventSocket)
		for i, kv := range env {
			if strings.HasPrefix(kv, "PYTHONPATH=") {
				env[i] = "PYTHONPATH=" + eventWrapperDir + ":" + strings.TrimPrefix(kv, "PYTHONPATH=")
			}
		}
	}
	in.mu.Lock()
	in.env = env
	in.mu.Unlock()
	if w.Interface == guest.InterfaceBinary {
		st, err := os.Stat(argv[0])
		if err != nil {
			return fmt.Errorf("entrypoint: %w", err)
		}
		if st.Mode()&0o111 == 0 {
			if err := os.Chmod(argv[0], st.Mode()|0o755); err != nil {
				return fmt.Errorf("entrypoint %s is not executable: %w", argv[0], err)
			}
		}
	}
	var echo io.Writer
	if in.cfg.Debug {
		echo = os.Stderr
	}
	cmd := command(argv, env, codeDir, in.user)
	// A session of its own: the workload is not on the console's terminal.
	cmd.SysProcAttr.Setsid, cmd.SysProcAttr.Setpgid = true, false
	wait, stdoutR, stderrR, err := in.startPiped(cmd, workloadCgroup)
	if err != nil {
		return err
	}
	goSafe(func() { in.logs.copy(guest.Stdout, stdoutR, echo) })
	goSafe(func() { in.logs.copy(guest.Stderr, stderrR, echo) })

	in.mu.Lock()
	in.pid = cmd.Process.Pid
	in.state = guest.StateRunning
	in.boot.Started = uptime()
	in.mu.Unlock()

	goSafe(in.waitReady)
	goSafe(func() {
		ws := <-wait
		cmd.Process.Release()
		in.workloadExited(ws)
	})
	return nil
}

// waitReady polls port 8080 until it accepts a connection or the workload
// ends.
func (in *Init) waitReady() {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(guest.Port))
	for {
		select {
		case <-in.exited:
			return
		default:
		}
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			in.mu.Lock()
			if in.state == guest.StateRunning {
				in.state = guest.StateReady
				in.boot.Ready = uptime()
				in.emitLocked(guest.EventReady)
				b := in.boot
				in.mu.Unlock()
				logf("ready %v after the kernel started: %s", ms(b.Ready), bootSummary(b))
				return
			}
			in.mu.Unlock()
			return
		}
		time.Sleep(readyPoll)
	}
}

// bootSummary says where the boot's time went.
func bootSummary(b guest.Boot) string {
	return fmt.Sprintf("kernel %v, init: modules %v, config %v, mounts %v, network %v, start %v (module wait %v), workload to ready %v",
		ms(b.InitStart), ms(b.Modules-b.InitStart), ms(b.Config-b.Modules), ms(b.Mounts-b.Config),
		ms(b.Network-b.Mounts), ms(b.Started-b.Network), ms(b.ModuleWait), ms(b.Ready-b.Started))
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

func (in *Init) workloadExited(ws unix.WaitStatus) {
	code, sig := exitCode(ws)
	oom := oomKills(workloadCgroup) > 0
	in.mu.Lock()
	defer in.mu.Unlock()
	in.exitCode, in.signal, in.oom = &code, sig, in.oom || oom
	if in.state != guest.StateHalting {
		in.state = guest.StateExited
	}
	close(in.exited)
	logf("workload exited with %d (signal %d, OOM-killed %v)", code, sig, in.oom)
	in.emitLocked(guest.EventExited)
}

// checkOOM reports an OOM kill in the workload's cgroup while it runs
// (a child killed while the main process survives).
func (in *Init) checkOOM() {
	n := oomKills(workloadCgroup)
	in.mu.Lock()
	defer in.mu.Unlock()
	if n > in.oomSeen {
		in.oomSeen = n
		in.oom = true
		in.emitLocked(guest.EventOOM)
	}
}

// Exec implements guest.Agent.
func (in *Init) Exec(ctx context.Context, req guest.ExecRequest) (guest.ExecResult, error) {
	in.mu.Lock()
	ready := in.env != nil
	in.mu.Unlock()
	if !ready {
		return guest.ExecResult{}, errors.New("the root filesystem is not ready")
	}
	u, err := execUser(in.user, req.User)
	if err != nil {
		return guest.ExecResult{}, err
	}
	env := workloadEnv(u, in.cfg.Hostname, in.cfg.Workload.Variables)
	for _, k := range slices.Sorted(maps.Keys(req.Env)) {
		env = append(env, k+"="+req.Env[k])
	}
	dir := req.Dir
	if dir == "" {
		dir = codeDir
	}
	timeout := req.Timeout
	if timeout <= 0 {
		timeout = time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	cmd := command(req.Argv, env, dir, u)
	if len(req.Stdin) > 0 {
		stdin, err := feed(req.Stdin)
		if err != nil {
			return guest.ExecResult{}, err
		}
		defer stdin.Close()
		cmd.Stdin = stdin
	}
	stdout, stderr := &cappedBuffer{max: guest.MaxExecOutput}, &cappedBuffer{max: guest.MaxExecOutput}
	wait, outR, errR, err := in.startPiped(cmd, execCgroup)
	if err != nil {
		return guest.ExecResult{}, err
	}
	var copying sync.WaitGroup
	for _, c := range []struct {
		dst *cappedBuffer
		src *os.File
	}{{stdout, outR}, {stderr, errR}} {
		copying.Add(1)
		goSafe(func() {
			defer copying.Done()
			io.Copy(c.dst, c.src)
		})
	}
	var res guest.ExecResult
	var ws unix.WaitStatus
	select {
	case ws = <-wait:
	case <-ctx.Done():
		unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		ws = <-wait
		res.TimedOut = true
	}
	cmd.Process.Release()
	// Output still held open by a background child is not waited for long.
	copied := make(chan struct{})
	goSafe(func() { copying.Wait(); close(copied) })
	select {
	case <-copied:
	case <-time.After(100 * time.Millisecond):
	}
	outR.Close()
	errR.Close()
	<-copied
	res.ExitCode, res.Signal = exitCode(ws)
	res.Stdout, res.Stderr = stdout.Bytes(), stderr.Bytes()
	res.Truncated = stdout.truncated || stderr.truncated
	return res, nil
}

// feed returns the read end of a pipe that delivers data, then EOF.
func feed(data []byte) (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	goSafe(func() {
		w.Write(data)
		w.Close()
	})
	return r, nil
}

// cappedBuffer keeps the first max bytes written to it.
type cappedBuffer struct {
	mu        sync.Mutex
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (b *cappedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	room := b.max - b.buf.Len()
	if len(p) > room {
		b.truncated = true
		b.buf.Write(p[:max(room, 0)])
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (b *cappedBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}

// serveAPI serves the guest API on its socket, for every user of the VM
// (the VM is one tenant's). Without it the workload runs on; its SDK
// calls fail.
func (in *Init) serveAPI() {
	os.Remove(guest.APISocket)
	ln, err := net.Listen("unix", guest.APISocket)
	if err != nil {
		logf("guest API socket: %v", err)
		return
	}
	if err := os.Chmod(guest.APISocket, 0o666); err != nil {
		logf("guest API socket: %v", err)
	}
	srv := &http.Server{Handler: in.api, ReadHeaderTimeout: 10 * time.Second}
	goSafe(func() { logf("guest API: %v", srv.Serve(ln)) })
}
