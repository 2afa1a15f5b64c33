package assets

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/alephvm/alephvm/guest"
)

// moduleName is the kernel's name of a module file: dashes and
// underscores are the same to it.
func moduleName(file string) string {
	return strings.ReplaceAll(strings.TrimSuffix(path.Base(file), ".ko"), "-", "_")
}

// kernelModules indexes the modules of an unpacked kernel: the files by
// name, and the names built into the kernel (modules.builtin).
type kernelModules struct {
	dir     string            // lib/modules/<release>
	files   map[string]string // name -> path relative to dir
	builtin map[string]bool
}

func openKernelModules(dir string) (*kernelModules, error) {
	km := &kernelModules{dir: dir, files: map[string]string{}, builtin: map[string]bool{}}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			rel, _ := filepath.Rel(dir, p)
			km.files[moduleName(p)] = rel
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kernel modules: %w", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	if err != nil {
		return nil, fmt.Errorf("kernel modules: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			km.builtin[moduleName(l)] = true
		}
	}
	return km, nil
}

// closure returns the named modules and everything they depend on, each
// module after its dependencies, with File set to where the initramfs
// puts it (lib/modules/<name>.ko) or empty when it is built in.
func (km *kernelModules) closure(names []string) ([]guest.Module, error) {
	var out []guest.Module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel module dependency cycle at %s", name)
		case 2:
			return nil
		}
		state[name] = 1
		m := guest.Module{Name: name}
		if !km.builtin[name] {
			file, ok := km.files[name]
			if !ok {
				return fmt.Errorf("kernel module %s (needed by %s) is neither a module nor built in", name, from)
			}
			deps, err := moduleDepends(filepath.Join(km.dir, file))
			if err != nil {
				return err
			}
			for _, d := range deps {
				if err := visit(d, name); err != nil {
					return err
				}
			}
			m.File, m.Deps = path.Join("lib/modules", name+".ko"), deps
		}
		state[name] = 2
		out = append(out, m)
		return nil
	}
	sorted := append([]string(nil), names...)
	sort.Strings(sorted)
	for _, n := range sorted {
		if err := visit(moduleName(n), "alephvm-init"); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// moduleDepends reads the depends= entry of a module's .modinfo section.
func moduleDepends(file string) ([]string, error) {
	f, err := elf.Open(file)
	if err != nil {
		return nil, fmt.Errorf("kernel module %s: %w", file, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("kernel module %s: no .modinfo section", file)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("kernel module %s: %w", file, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d != "" {
					deps = append(deps, moduleName(d))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

// moduleSigMagic ends a signed kernel module.
var moduleSigMagic = []byte("~Module signature appended~\n")

// stripModuleSignature returns a module without its appended signature:
// the signature, the signer and key id, then a 12-byte struct
// module_signature (signer_len at 3, key_id_len at 4, sig_len big-endian
// at 8) and the magic. Unsigned modules are returned as they are.
func stripModuleSignature(b []byte) ([]byte, error) {
	if !bytes.HasSuffix(b, moduleSigMagic) {
		return b, nil
	}
	end := len(b) - len(moduleSigMagic) - 12
	if end < 0 {
		return nil, errors.New("module signature: truncated")
	}
	info := b[end : end+12]
	cut := int(binary.BigEndian.Uint32(info[8:])) + int(info[3]) + int(info[4])
	if cut > end {
		return nil, errors.New("module signature: longer than the module")
	}
	return b[:end-cut], nil
}
