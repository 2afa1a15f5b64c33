package hostile

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/execution"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/storage"
	"github.com/alephvm/alephvm/store"
)

// Layers: base images that name their parent by item hash, as the
// instance manager reads them (storage.InspectChain with its store's
// answers; LAYER_MAX_DEPTH at its default).

// layerHash is the item hash of the n-th made-up item of a layer row.
func layerHash(n int) message.ItemHash {
	return message.ItemHash(strings.Repeat(fmt.Sprintf("%x", n%16), 64))
}

// chainFile is one file of a layer row's store: a qcow2 made by qemu-img
// create with args (-u and 1 MiB added) or raw bytes.
type chainFile struct {
	qemuImg []string
	raw     []byte
}

// layerRow feeds the chain's first file to storage.InspectChain, the
// others being what the store gives for layerHash(i); a hash past them is
// one the store does not have.
func layerRow(input string, files ...chainFile) row {
	return row{category: "Images", input: input, target: "`storage.InspectChain`", needs: "qemu-img", run: func(t *testing.T) answer {
		dir := t.TempDir()
		paths := make([]string, len(files))
		for i, f := range files {
			paths[i] = filepath.Join(dir, fmt.Sprintf("item%d", i))
			if f.qemuImg == nil {
				if err := os.WriteFile(paths[i], f.raw, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			args := append(append([]string{"create", "-q", "-f", "qcow2", "-u"}, f.qemuImg...), paths[i], "1M")
			if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img %q: %v: %s", args, err, out)
			}
		}
		resolve := func(_ context.Context, hash message.ItemHash) (string, error) {
			for i := range paths {
				if layerHash(i) == hash {
					return paths[i], nil
				}
			}
			return "", execution.StoreError("Item", hash, store.ErrNotFound)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := storage.InspectChain(ctx, paths[0], resolve, storage.DefaultLayerMaxDepth)
		var se interface{ HTTPStatus() int }
		if err != nil && (!errors.As(err, &se) || se.HTTPStatus() >= 500) {
			t.Errorf("refused without a 4xx: %v", err)
		}
		a := refusedErr(t, err)
		if se != nil {
			a.text = fmt.Sprintf("%d %s", se.HTTPStatus(), a.text)
		}
		return a
	}}
}

func layerRows() []row {
	over := func(n int, format string) chainFile {
		return chainFile{qemuImg: []string{"-F", format, "-b", storage.LayerBacking(layerHash(n))}}
	}
	tooDeep := make([]chainFile, storage.DefaultLayerMaxDepth+2)
	for i := range tooDeep {
		tooDeep[i] = over(i+1, "qcow2")
	}
	tooDeep[len(tooDeep)-1] = chainFile{raw: make([]byte, 1<<20)}
	return []row{
		layerRow("a layer over an item whose backing file is `/etc/shadow`",
			over(1, "qcow2"), chainFile{qemuImg: []string{"-F", "raw", "-b", "/etc/shadow"}}),
		layerRow("a layer whose backing file is `aleph:///etc/shadow`", chainFile{qemuImg: []string{"-F", "raw", "-b", "aleph:///etc/shadow"}}),
		layerRow("a layer naming an item hash the store does not have", over(7, "raw")),
		layerRow("a layer naming itself through another (a loop)", over(1, "qcow2"), over(0, "qcow2")),
		layerRow(fmt.Sprintf("a chain of %d layers (LAYER_MAX_DEPTH %d)", len(tooDeep)-1, storage.DefaultLayerMaxDepth), tooDeep...),
		layerRow("a layer naming as raw a parent that is a qcow2 whose backing file is `/etc/shadow`",
			over(1, "raw"), chainFile{qemuImg: []string{"-F", "raw", "-b", "/etc/shadow"}}),
		layerRow("a layer naming as qcow2 a parent that is raw", over(1, "qcow2"), chainFile{raw: make([]byte, 1<<20)}),
	}
}
