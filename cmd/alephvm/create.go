package main

import (
	"archive/zip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/alephvm/alephvm/assets"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/store"
)

// localAddress is the owner of messages made on this node: they are
// unsigned and never leave it.
const localAddress = store.LocalSender

// localHeader is the header of the messages made on this node.
func localHeader() message.Header {
	return message.Header{Sender: localAddress, Channel: "alephvm-local", Time: time.Now()}
}

// itemRef returns the store ref of arg: a ref as it is, or a local file,
// added to the store first.
func itemRef(ctx context.Context, s *store.Store, arg string) (message.ItemHash, error) {
	if ref, err := message.ParseItemHash(arg); err == nil {
		return ref, nil
	}
	if _, err := os.Stat(arg); err != nil {
		return "", fmt.Errorf("%q is neither an item hash nor a file: %w", arg, err)
	}
	added, err := s.AddFile(ctx, arg)
	if err != nil {
		return "", err
	}
	return added.Ref, nil
}

func newInstanceCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "instance", Short: "Make INSTANCE messages"}
	var image, size, name, hv string
	var keys []string
	var vcpus, memory int
	var internet bool
	var ports []int
	create := &cobra.Command{
		Use:   "create",
		Short: "Write and store an INSTANCE message; print its hash",
		Long: `Write an INSTANCE message for a VM of --vcpus, --memory MiB and a root disk of
--size over the base image --image (an item hash, or an image file added to the
store first), with the SSH keys of the --ssh-key files, to run under
--hypervisor (Firecracker boots only a bare ext4 base such as debian-12-ext4;
empty leaves the choice to the node), and store it on this node. Start it with "alephvm vm start HASH" against a running node, or list it
in an allocation.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sizeMiB, err := parseMiB(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			environment := message.Environment{Internet: internet}
			switch hv {
			case "":
			case hypervisor.QEMU, hypervisor.Firecracker:
				h := message.Hypervisor(hv)
				environment.Hypervisor = &h
			default:
				return fmt.Errorf("--hypervisor: %q is neither qemu nor firecracker", hv)
			}
			var authorized []string
			for _, f := range keys {
				data, err := os.ReadFile(f)
				if err != nil {
					return fmt.Errorf("--ssh-key: %w", err)
				}
				for _, line := range strings.Split(string(data), "\n") {
					if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
						authorized = append(authorized, line)
					}
				}
			}
			if path, named, err := a.baseImagePath(image); err != nil {
				return err
			} else if named {
				image = path
			}
			return a.withStore(cmd.Context(), func(s *store.Store) error {
				parent, err := itemRef(cmd.Context(), s, image)
				if err != nil {
					return fmt.Errorf("--image: %w", err)
				}
				var published []message.PublishedPort
				for _, p := range ports {
					published = append(published, message.PublishedPort{Protocol: "tcp", Port: p})
				}
				raw, _, err := message.NewInstance(localHeader(), message.InstanceContent{
					ExecutableBase: message.ExecutableBase{
						Metadata:       map[string]any{"name": name},
						AuthorizedKeys: authorized,
						Resources:      message.MachineResources{VCPUs: int64(vcpus), MemoryMiB: int64(memory), Seconds: 30, PublishedPorts: published},
					},
					Environment: environment,
					Rootfs:      message.RootfsVolume{Parent: message.ParentVolume{Ref: parent}, Persistence: message.PersistenceHost, SizeMiB: sizeMiB},
				})
				if err != nil {
					return err
				}
				msg, err := s.AddMessage(cmd.Context(), raw)
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), msg.ItemHash)
				return nil
			})
		},
	}
	create.Flags().StringVar(&image, "image", "", "base image: debian-12 (the built UEFI disk), debian-12-ext4, an item hash, or an image file to add to the store (required)")
	create.Flags().StringVar(&size, "size", "4GiB", "root disk size (MiB, or with a unit: 8GiB, 10G)")
	create.Flags().StringArrayVar(&keys, "ssh-key", nil, "file of SSH public keys to authorize (repeatable)")
	create.Flags().IntVar(&vcpus, "vcpus", 1, "vCPUs")
	create.Flags().IntVar(&memory, "memory", 1024, "memory in MiB")
	create.Flags().BoolVar(&internet, "internet", false, "let the VM open connections to the outside world")
	create.Flags().IntSliceVar(&ports, "publish", nil, "guest TCP ports to forward from the host, besides 22 (repeatable)")
	create.Flags().StringVar(&name, "name", "", "a name for the instance, kept in its metadata")
	create.Flags().StringVar(&hv, "hypervisor", hypervisor.QEMU, "qemu or firecracker; empty: the node's INSTANCE_DEFAULT_HYPERVISOR")
	_ = create.MarkFlagRequired("image")
	cmd.AddCommand(create)
	return cmd
}

// parseMiB reads a size in MiB, or with a unit (MiB, GiB, TiB, M, G, T).
func parseMiB(s string) (int64, error) {
	units := []struct {
		suffix string
		mib    float64
	}{{"TiB", 1 << 20}, {"GiB", 1 << 10}, {"MiB", 1}, {"T", 1e12 / (1 << 20)}, {"G", 1e9 / (1 << 20)}, {"M", 1e6 / (1 << 20)}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(strings.TrimSpace(s), u.suffix); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
			if err != nil || f <= 0 {
				return 0, fmt.Errorf("invalid size %q", s)
			}
			return int64(f*u.mib + 0.999999), nil
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("invalid size %q: want MiB or a size with a unit such as 8GiB", s)
	}
	return n, nil
}

// packCode packs dir as the code of a program: a zip, or a squashfs
// (mksquashfs), written to a temporary file the caller removes.
func packCode(ctx context.Context, dir string, enc message.Encoding) (string, error) {
	tmp, err := os.CreateTemp("", "alephvm-code-*")
	if err != nil {
		return "", err
	}
	path := tmp.Name()
	switch enc {
	case message.EncodingZip:
		err = zipDir(tmp, dir)
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
	case message.EncodingSquashfs:
		tmp.Close()
		os.Remove(path)
		out, cerr := exec.CommandContext(ctx, "mksquashfs", dir, path, "-noappend", "-quiet", "-no-progress", "-all-root").CombinedOutput()
		if cerr != nil {
			err = fmt.Errorf("mksquashfs: %w: %s", cerr, strings.TrimSpace(string(out)))
		}
	default:
		tmp.Close()
		err = fmt.Errorf("encoding must be zip or squashfs, got %q", enc)
	}
	if err != nil {
		os.Remove(path)
		return "", err
	}
	return path, nil
}

func zipDir(w io.Writer, dir string) error {
	zw := zip.NewWriter(w)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if !info.Mode().IsRegular() && !info.IsDir() {
			return fmt.Errorf("%s: only files and directories can be packed", path)
		}
		h, err := zip.FileInfoHeader(info)
		if err != nil {
			return err
		}
		h.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			h.Name += "/"
			_, err = zw.CreateHeader(h)
			return err
		}
		h.Method = zip.Deflate
		fw, err := zw.CreateHeader(h)
		if err != nil {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(fw, f)
		return err
	})
	if err != nil {
		return err
	}
	return zw.Close()
}

func newProgramCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{Use: "program", Short: "Make PROGRAM messages"}
	var entrypoint, iface, encoding, runtimeRef string
	var vcpus, memory, seconds int
	var internet, persistent bool
	var env, subscribe, volumeSpecs []string
	create := &cobra.Command{
		Use:   "create DIR",
		Short: "Pack DIR as a program's code, store it with its PROGRAM message; print its hash and URL",
		Long: `Pack DIR (zip, or squashfs with --encoding squashfs) as the code of a program,
add it to the store, write the PROGRAM message with --entrypoint and the
runtime (--runtime: an item hash or a squashfs file; by default the runtime
built by "alephvm assets build"), store it, and print its hash and the URL a
running node serves it at. The interface is --interface, else asgi when the
entrypoint has a colon (module:app), else binary (a file of DIR that listens on
port 8080).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if entrypoint == "" {
				return errors.New("--entrypoint is required")
			}
			if st, err := os.Stat(args[0]); err != nil || !st.IsDir() {
				return fmt.Errorf("%s is not a directory", args[0])
			}
			code, err := packCode(ctx, args[0], message.Encoding(encoding))
			if err != nil {
				return err
			}
			defer os.Remove(code)
			var subscriptions []map[string]any
			for _, sub := range subscribe {
				var m map[string]any
				if err := json.Unmarshal([]byte(sub), &m); err != nil || len(m) == 0 {
					return fmt.Errorf("--subscribe %q: want a JSON object such as {\"channel\":\"TEST\"}", sub)
				}
				subscriptions = append(subscriptions, m)
			}
			volumes, err := parseVolumes(volumeSpecs)
			if err != nil {
				return err
			}
			var variables map[string]string
			for _, kv := range env {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("--env %q: want NAME=VALUE", kv)
				}
				if variables == nil {
					variables = map[string]string{}
				}
				variables[k] = v
			}
			return a.withStore(ctx, func(s *store.Store) error {
				codeAdded, err := s.AddFile(ctx, code)
				if err != nil {
					return err
				}
				rt := runtimeRef
				if rt == "" {
					if rt, err = a.defaultRuntime(ctx); err != nil {
						return err
					}
				}
				runtime, err := itemRef(ctx, s, rt)
				if err != nil {
					return fmt.Errorf("--runtime: %w", err)
				}
				codeContent := message.CodeContent{Encoding: message.Encoding(encoding), Entrypoint: entrypoint, Ref: codeAdded.Ref}
				if iface != "" {
					i := message.Interface(iface)
					codeContent.Interface = &i
				}
				raw, _, err := message.NewProgram(localHeader(), message.ProgramContent{
					ExecutableBase: message.ExecutableBase{
						Variables: variables,
						Resources: message.MachineResources{VCPUs: int64(vcpus), MemoryMiB: int64(memory), Seconds: int64(seconds)},
						Volumes:   volumes,
					},
					Type:        "vm-function",
					Environment: message.Environment{Internet: internet},
					Code:        codeContent,
					Runtime:     message.FunctionRuntime{Ref: runtime, Comment: "alephvm runtime"},
					On:          message.FunctionTriggers{HTTP: true, Persistent: persistentFlag(persistent), Message: subscriptions},
				})
				if err != nil {
					return err
				}
				msg, err := s.AddMessage(ctx, raw)
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), msg.ItemHash)
				fmt.Fprintf(cmd.OutOrStdout(), "%s/vm/%s/\n", a.nodeURL(), msg.ItemHash)
				return nil
			})
		},
	}
	create.Flags().StringVar(&entrypoint, "entrypoint", "", "module:app for an ASGI app, or the file to run for a binary (required)")
	create.Flags().StringVar(&iface, "interface", "", "asgi or binary (default: inferred from the entrypoint)")
	create.Flags().StringVar(&encoding, "encoding", "zip", "how the code is packed: zip or squashfs")
	create.Flags().StringVar(&runtimeRef, "runtime", "", "runtime: an item hash or a squashfs file (default: the one built by alephvm assets build)")
	create.Flags().IntVar(&vcpus, "vcpus", 1, "vCPUs")
	create.Flags().IntVar(&memory, "memory", 256, "memory in MiB")
	create.Flags().IntVar(&seconds, "seconds", 30, "how long the program may take to answer a request")
	create.Flags().BoolVar(&internet, "internet", false, "let the program open connections to the outside world")
	create.Flags().StringArrayVar(&subscribe, "subscribe", nil, "a subscription (on.message) as JSON, e.g. '{\"channel\":\"TEST\"}': messages of the network that match it are delivered to the program (repeatable; ASGI programs)")
	create.Flags().BoolVar(&persistent, "persistent", false, "a persistent program (on.persistent): run by the scheduler's allocations without requests")
	create.Flags().StringArrayVar(&env, "env", nil, "NAME=VALUE variable for the program (repeatable)")
	create.Flags().StringArrayVar(&volumeSpecs, "volume", nil, "a volume: mount=/data,name=data,size=64[,parent=HASH] for a persistent one kept on the node (size in MiB; starting as a copy of the ext4 or squashfs item parent), mount=/opt/lib,ref=HASH for an immutable one (a STORE message's hash) (repeatable)")
	cmd.AddCommand(create)
	return cmd
}

// defaultRuntime is the runtime a program gets when none is named: the
// file alephvm assets build made, added to this node's store (adding the
// same bytes again gives the same ref).
func (a *app) defaultRuntime(context.Context) (string, error) {
	m, err := assets.Load(a.cfg.Assets())
	if err == nil {
		var path string
		if path, err = m.Path(assets.Runtime); err == nil {
			return path, nil
		}
	}
	return "", fmt.Errorf("no runtime named and none built: pass --runtime (an item hash or a squashfs file), or run alephvm assets build: %w", err)
}

// persistentFlag is on.persistent: true, or absent.
func persistentFlag(on bool) *bool {
	if !on {
		return nil
	}
	return &on
}

// parseVolumes reads --volume flags: comma-separated key=value pairs,
// mount always; ref for an immutable volume, else name and size (MiB) for a
// persistent volume kept on the node.
func parseVolumes(specs []string) ([]message.MachineVolume, error) {
	var out []message.MachineVolume
	for _, spec := range specs {
		fields := map[string]string{}
		for _, kv := range strings.Split(spec, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || v == "" {
				return nil, fmt.Errorf("--volume %q: want key=value pairs (mount, ref, name, size)", spec)
			}
			switch k {
			case "mount", "ref", "name", "size", "parent":
			default:
				return nil, fmt.Errorf("--volume %q: unknown key %q (mount, ref, name, size, parent)", spec, k)
			}
			fields[k] = v
		}
		mount, ok := fields["mount"]
		if !ok || !strings.HasPrefix(mount, "/") {
			return nil, fmt.Errorf("--volume %q: mount=/absolute/path is required", spec)
		}
		vol := message.MachineVolume{Mount: &mount}
		if ref, ok := fields["ref"]; ok {
			if fields["name"] != "" || fields["size"] != "" || fields["parent"] != "" {
				return nil, fmt.Errorf("--volume %q: an immutable volume (ref) has no name, size or parent", spec)
			}
			// use_latest is true unless set, in the reference's schema.
			vol.Ref, vol.UseLatest = message.ItemHash(ref), true
			out = append(out, vol)
			continue
		}
		name, size := fields["name"], fields["size"]
		mib, err := strconv.ParseInt(size, 10, 64)
		if name == "" || err != nil || mib <= 0 {
			return nil, fmt.Errorf("--volume %q: a persistent volume needs name= and size= (MiB, above 0)", spec)
		}
		persistence := message.PersistenceHost
		vol.Name, vol.SizeMiB, vol.Persistence = &name, mib, &persistence
		if parent := fields["parent"]; parent != "" {
			vol.Parent = &message.ParentVolume{Ref: message.ItemHash(parent), UseLatest: true}
		}
		out = append(out, vol)
	}
	return out, nil
}
