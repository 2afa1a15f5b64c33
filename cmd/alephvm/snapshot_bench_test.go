package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testassets"
	"github.com/alephvm/alephvm/internal/testenv"
)

// BenchmarkProgramSnapshots measures, in one run, for both examples: the
// cold start through the node (a new program's first request until its
// answer) of programs restored from a template divided by that of booted
// programs (median of 10 each), and the memory (PSS) of 10 idle restored
// VMs against 10 booted ones. The restored programs' phases are in the
// node's log lines "program started" (ALEPH_VM_BENCH_LOG=1 prints them).
//
//	go test -run NONE -bench ProgramSnapshots -benchtime 1x -timeout 60m ./cmd/alephvm
func BenchmarkProgramSnapshots(b *testing.B) {
	assetsDir := testassets.ProgramAssets(b)
	testenv.RequireTools(b, "qemu-system-x86_64", "nft", "mkfs.ext4", "go")
	for range b.N {
		for _, example := range []string{"go-hello", "asgi-hello"} {
			booted := snapshotRun(b, assetsDir, example, bootMode)
			tmpl := snapshotRun(b, assetsDir, example, templateMode)
			own := snapshotRun(b, assetsDir, example, ownMode)
			b.ReportMetric(booted.cold.Seconds(), "s/booted-"+example)
			b.ReportMetric(tmpl.cold.Seconds(), "s/template-"+example)
			b.ReportMetric(own.cold.Seconds(), "s/own-snapshot-"+example)
			b.ReportMetric(tmpl.cold.Seconds()/booted.cold.Seconds(), "ratio-template-"+example)
			b.ReportMetric(own.cold.Seconds()/booted.cold.Seconds(), "ratio-own-snapshot-"+example)
			b.ReportMetric(float64(booted.pss>>20), "MiB-PSS-10-booted-"+example)
			b.ReportMetric(float64(tmpl.pss>>20), "MiB-PSS-10-template-"+example)
			b.ReportMetric(float64(own.pss>>20), "MiB-PSS-10-own-snapshot-"+example)
		}
	}
}

// coldStarts is the median cold start of 10 programs, and the PSS of their
// 10 VMs once idle.
type coldStarts struct {
	cold time.Duration
	pss  uint64
}

// How the programs of a snapshotRun start.
type startMode int

const (
	bootMode     startMode = iota // booted: no snapshots
	templateMode                  // restored from their template
	ownMode                       // restored from their own snapshots
)

// snapshotRun starts a node and 10 programs of the example one after the
// other, booted or restored from their template; in ownMode, once each has
// a snapshot of its own, it stops them and starts them again, from those,
// and measures that.
func snapshotRun(b *testing.B, assetsDir, example string, mode startMode) coldStarts {
	snapshots := mode != bootMode
	dir, port, env := nodeEnv(b, "lo", "10.0.0.53")
	env = append(env, "ALEPH_VM_ASSETS_DIR="+assetsDir, "ALEPH_VM_REUSE_TIMEOUT=3600", "ALEPH_VM_INIT_TIMEOUT=300",
		"ALEPH_VM_PROGRAM_HYPERVISOR=qemu", "ALEPH_VM_PROGRAM_SNAPSHOTS="+strconv.FormatBool(snapshots), "ALEPH_VM_PROGRAM_SNAPSHOTS_PER_PROGRAM="+strconv.FormatBool(mode == ownMode), "ALEPH_VM_VCPU_OVERCOMMIT_FACTOR=16")
	node := startNode(b, env, port)
	defer func() {
		node.cmd.Process.Signal(syscall.SIGTERM)
		node.cmd.Wait()
		if os.Getenv("ALEPH_VM_BENCH_LOG") != "" {
			for _, l := range strings.Split(node.logs.String(), "\n") {
				if strings.Contains(l, "program started") || strings.Contains(l, "template built") || strings.Contains(l, "failed") || strings.Contains(l, "restored from") {
					b.Log(l)
				}
			}
		}
	}()
	create := func(i int) string {
		var args []string
		if example == "go-hello" {
			ref := createGoHello(b, env, dir, "--env", fmt.Sprintf("N=%d", i))
			return ref
		}
		args = []string{"program", "create", "../../examples/asgi-hello", "--entrypoint", "main:app", "--env", fmt.Sprintf("N=%d", i)}
		code, out, errOut := runCLI(b, env, args...)
		if code != 0 {
			b.Fatalf("program create: %s %s", out, errOut)
		}
		return strings.Fields(out)[0]
	}
	get := func(ref string) time.Duration {
		start := time.Now()
		if status, body := httpGet(b, programURL(port, ref, "/")); status != 200 {
			b.Fatalf("%s: %d %s\n%s", ref, status, body, node.logs.String())
		}
		return time.Since(start)
	}
	if snapshots {
		// A first program boots and has the template built.
		get(create(-1))
		for deadline := time.Now().Add(5 * time.Minute); !strings.Contains(node.logs.String(), `msg="template built"`); time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				b.Fatalf("no template built:\n%s", node.logs.String())
			}
		}
	}
	var refs []string
	for i := range 10 {
		refs = append(refs, create(i))
	}
	measure := func() coldStarts {
		var times []time.Duration
		for _, ref := range refs {
			times = append(times, get(ref))
		}
		time.Sleep(5 * time.Second) // idle
		var pss uint64
		for _, ref := range refs {
			pss += qemuPSS(b, "prog-"+ref[:12])
		}
		slices.Sort(times)
		return coldStarts{(times[4] + times[5]) / 2, pss}
	}
	first := measure()
	if !snapshots {
		return first
	}
	for _, ref := range refs {
		if !restoredInLog(node.logs.String(), ref) {
			b.Fatalf("program %s was not restored:\n%s", ref, node.logs.String())
		}
	}
	if mode == templateMode {
		return first
	}
	// Each program's own snapshot, built in the background.
	for deadline := time.Now().Add(20 * time.Minute); ; time.Sleep(time.Second) {
		built := 0
		for _, ref := range refs {
			if strings.Contains(node.logs.String(), "program="+ref+" vcpus=") {
				built++
			}
		}
		if built == len(refs) {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d programs' snapshots built of %d:\n%s", built, len(refs), node.logs.String())
		}
	}
	for _, ref := range refs {
		if status, body := operatorPost(b, fmt.Sprintf("http://127.0.0.1:%d/control/machine/%s/stop", port, ref)); status != 200 {
			b.Fatalf("stop %s: %d %s", ref, status, body)
		}
	}
	second := measure()
	if n := strings.Count(node.logs.String(), "program_snapshot=true qemu_and_state="); n != len(refs) {
		b.Fatalf("%d restores from programs' own snapshots, want %d:\n%s", n, len(refs), node.logs.String())
	}
	return second
}

// qemuPSS is the proportional set size of the QEMU process whose guest
// name is name.
func qemuPSS(b *testing.B, name string) uint64 {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		cmdline, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(cmdline), "guest="+name+",") {
			continue
		}
		f, err := os.Open(filepath.Join(filepath.Dir(p), "smaps_rollup"))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "Pss:"); ok {
				kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				return kb << 10
			}
		}
	}
	b.Fatalf("no QEMU process of %s", name)
	return 0
}
