// Command fakefirecracker stands in for Firecracker and its jailer in the
// driver's tests, where no KVM runs guests. It keeps their contracts as
// the v1.16.1 sources state them, and nothing more:
//
//   - As the jailer (when given --exec-file): it makes
//     <chroot base>/<exec name>/<id>/root, copies the binary there, makes
//     /dev/kvm and /dev/net/tun, starts the binary chrooted there as --uid
//     and --gid in a new PID namespace, writes its pid to
//     /firecracker.pid in the jail and exits. It does not set cgroups.
//   - As Firecracker: it reads --config-file, opens the kernel, initrd and
//     drives as Firecracker would (read-only or read-write) and its log
//     file, fails like Firecracker when one cannot be opened, serves the
//     API on --api-sock (GET /, PATCH /vm, PUT /actions) and the host end
//     of the vsock device, where guest port 52 echoes lines. Ctrl-alt-del
//     ends it as a guest reboot does, unless the boot arguments hold
//     fake.ignore-cad. With fake.fail in them, it fails at once. With
//     fake.flood, the guest writes console lines as fast as it can: like
//     Firecracker, it makes its stdout non-blocking and drops what a full
//     pipe does not take.
//
// Built static, so that it runs in an empty chroot.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/alephvm/alephvm/hypervisor/firecracker"
)

func main() {
	args := os.Args[1:]
	if len(args) == 1 && args[0] == "--version" {
		fmt.Println("Firecracker v1.16.1")
		return
	}
	flags, rest := parse(args)
	var err error
	if _, ok := flags["exec-file"]; ok {
		err = jailer(flags, rest)
	} else {
		err = vmm(flags)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakefirecracker:", err)
		os.Exit(1)
	}
}

// parse reads --name value pairs (and --new-pid-ns) up to "--".
func parse(args []string) (map[string]string, []string) {
	flags := map[string]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return flags, args[i+1:]
		case a == "--new-pid-ns":
			flags["new-pid-ns"] = ""
		case strings.HasPrefix(a, "--") && i+1 < len(args):
			flags[a[2:]] += args[i+1]
			i++
		}
	}
	return flags, nil
}

func jailer(flags map[string]string, rest []string) error {
	exe, err := filepath.EvalSymlinks(flags["exec-file"])
	if err != nil {
		return err
	}
	base, err := filepath.EvalSymlinks(flags["chroot-base-dir"])
	if err != nil {
		return err
	}
	uid, _ := strconv.Atoi(flags["uid"])
	gid, _ := strconv.Atoi(flags["gid"])
	root := filepath.Join(base, filepath.Base(exe), flags["id"], "root")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	jailed := filepath.Join(root, filepath.Base(exe))
	if err := copyFile(exe, jailed, uid, gid); err != nil {
		return err
	}
	for _, d := range []string{"/", "/dev", "/dev/net", "/run"} {
		p := filepath.Join(root, d)
		os.MkdirAll(p, 0o700)
		os.Chmod(p, 0o700)
		os.Chown(p, uid, gid)
	}
	for _, dev := range []struct {
		path         string
		major, minor uint32
	}{{"/dev/kvm", 10, 232}, {"/dev/net/tun", 10, 200}} {
		p := filepath.Join(root, dev.path)
		if err := syscall.Mknod(p, syscall.S_IFCHR|0o600, int(dev.major<<8|dev.minor)); err != nil {
			return fmt.Errorf("mknod %s: %w", p, err)
		}
		os.Chown(p, uid, gid)
	}
	cmd := exec.Command("/"+filepath.Base(exe), append([]string{"--id", flags["id"]}, rest...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Chroot:     root,
		Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
		Cloneflags: syscall.CLONE_NEWPID,
		Setsid:     true,
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	pidfile, err := os.OpenFile(filepath.Join(root, "firecracker.pid"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprint(pidfile, cmd.Process.Pid)
	return pidfile.Close()
}

func copyFile(src, dst string, uid, gid int) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	if err := out.Chown(uid, gid); err != nil {
		return err
	}
	return out.Close()
}

func vmm(flags map[string]string) error {
	data, err := os.ReadFile(flags["config-file"])
	if err != nil {
		return err
	}
	var cfg firecracker.Config
	if err := json.Unmarshal(data, &cfg); err != nil {
		return err
	}
	open := func(path string, readOnly bool) error {
		mode := os.O_RDWR
		if readOnly {
			mode = os.O_RDONLY
		}
		f, err := os.OpenFile(path, mode, 0)
		if err != nil {
			return err
		}
		return f.Close()
	}
	var log io.Writer = io.Discard
	if cfg.Logger != nil {
		f, err := os.OpenFile(cfg.Logger.LogPath, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("logger: %w", err)
		}
		log = f
	}
	if strings.Contains(cfg.BootSource.BootArgs, "fake.fail") {
		return errors.New("fake.fail in the boot arguments")
	}
	if err := open(cfg.BootSource.KernelImagePath, true); err != nil {
		return fmt.Errorf("boot source: %w", err)
	}
	if p := cfg.BootSource.InitrdPath; p != "" {
		if err := open(p, true); err != nil {
			return fmt.Errorf("initrd: %w", err)
		}
	}
	for _, d := range cfg.Drives {
		if err := open(d.PathOnHost, d.IsReadOnly); err != nil {
			fmt.Fprintf(log, "[%s:ERROR] drive %s: %v\n", flags["id"], d.DriveID, err)
			return fmt.Errorf("drive %s: %w", d.DriveID, err)
		}
	}
	if cfg.Vsock != nil {
		ln, err := net.Listen("unix", cfg.Vsock.UDSPath)
		if err != nil {
			return err
		}
		go serveVsock(ln)
	}
	ln, err := net.Listen("unix", flags["api-sock"])
	if err != nil {
		return err
	}
	fmt.Fprintf(log, "[%s:INFO] running as %d:%d\n", flags["id"], os.Getuid(), os.Getgid())
	fmt.Printf("console: %s booted\n", flags["id"])
	if strings.Contains(cfg.BootSource.BootArgs, "fake.flood") {
		go flood()
	}
	api := &api{id: flags["id"], state: firecracker.StateRunning,
		ignoreCAD: strings.Contains(cfg.BootSource.BootArgs, "fake.ignore-cad")}
	return http.Serve(ln, api)
}

type api struct {
	id        string
	ignoreCAD bool
	mu        sync.Mutex
	state     string
}

func (a *api) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var body map[string]string
	json.NewDecoder(r.Body).Decode(&body)
	switch r.Method + " " + r.URL.Path {
	case "GET /":
		json.NewEncoder(w).Encode(firecracker.InstanceInfo{ID: a.id, State: a.state, VMMVersion: "1.16.1", AppName: "Firecracker"})
	case "PATCH /vm":
		a.state = map[string]string{"Paused": firecracker.StatePaused, "Resumed": firecracker.StateRunning}[body["state"]]
		w.WriteHeader(http.StatusNoContent)
	case "PUT /actions":
		w.WriteHeader(http.StatusNoContent)
		if body["action_type"] == "SendCtrlAltDel" && !a.ignoreCAD {
			fmt.Println("console: reboot: Restarting system")
			time.AfterFunc(20*time.Millisecond, func() { os.Exit(0) })
		}
	default:
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `{"fault_message":"fake: %s %s not handled"}`, r.Method, r.URL.Path)
	}
}

// flood writes numbered console lines forever, dropping those a full
// stdout does not take, as Firecracker's serial device does.
func flood() {
	_ = syscall.SetNonblock(1, true)
	for i := 0; ; i++ {
		_, _ = syscall.Write(1, []byte(fmt.Sprintf("console: line %d %s\n", i, strings.Repeat("=", 60))))
		if i%20 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
}

func serveVsock(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			line, err := r.ReadString('\n')
			if err != nil || line != fmt.Sprintf("CONNECT %d\n", firecracker.ControlVsockPort) {
				return // nothing listens there in the guest
			}
			fmt.Fprint(c, "OK 1073741824\n")
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				fmt.Fprint(c, "echo "+line)
			}
		}()
	}
}
