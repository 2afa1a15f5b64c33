package assets

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"

	"github.com/alephvm/alephvm/guest"
)

// checkStatic makes sure the init is a static x86-64 executable, which is
// all an initramfs can run.
func checkStatic(file string) error {
	f, err := elf.Open(file)
	if err != nil {
		return fmt.Errorf("init binary %s: %w", file, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return fmt.Errorf("init binary %s: not an x86-64 executable", file)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("init binary %s is dynamically linked: build it with CGO_ENABLED=0", file)
		}
	}
	return nil
}

// writeInitramfs writes the initramfs: the init at /init, /dev/console
// (the kernel opens it for the init's standard streams before anything
// is mounted), the mount points the init uses, and the modules with
// their index at guest.ModuleIndexPath, without their signatures unless
// keepSignatures.
func writeInitramfs(out string, initBinary []byte, km *kernelModules, mods []guest.Module, keepSignatures bool) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	c := newCPIOWriter(bw)
	for _, d := range []string{"dev", "proc", "sys", "lib", "lib/modules", "mnt", "newroot"} {
		c.Dir(d, 0o755)
	}
	c.CharDevice("dev/console", 0o600, 5, 1)
	c.File("init", 0o755, initBinary)
	var index bytes.Buffer
	if err := guest.FormatModuleIndex(&index, mods); err != nil {
		f.Close()
		return err
	}
	for _, m := range mods {
		if m.File == "" {
			continue
		}
		data, err := os.ReadFile(filepath.Join(km.dir, km.files[m.Name]))
		if err == nil && !keepSignatures {
			data, err = stripModuleSignature(data)
		}
		if err != nil {
			f.Close()
			return fmt.Errorf("module %s: %w", m.Name, err)
		}
		c.File(m.File, 0o644, data)
	}
	c.File(guest.ModuleIndexPath[1:], 0o644, index.Bytes())
	if err := c.Close(); err != nil {
		f.Close()
		return err
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
