package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testenv"
	"github.com/alephvm/alephvm/message"
)

// hashOf is a made-up item hash for the tests' store.
func hashOf(name string) message.ItemHash {
	return message.ItemHash(fmt.Sprintf("%064x", []byte(name))[:64])
}

// layer makes name a qcow2 layer naming its parent by item hash with
// format (qemu-img create -u: it cannot open aleph://).
func (h hostile) layer(name string, parentHash message.ItemHash, format string) string {
	h.t.Helper()
	return h.qemuImg(name, "-f", "qcow2", "-u", "-F", format, "-b", LayerBacking(parentHash))
}

// TestInspectChain: a layer names its parent by item hash, resolved by
// the store; the chain comes back top first, each image with its format.
// A path in a backing field is refused as for a plain parent; so are an
// unknown hash (with the store's error and the hash), a loop, a chain
// deeper than the limit, a parent's format other than the one named, and
// a layer that asks for more than its parent (a data file, encryption).
func TestInspectChain(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	h := hostile{t, t.TempDir()}
	mbr := make([]byte, 512)
	mbr[510], mbr[511] = 0x55, 0xaa
	raw := h.bytes("base.img", mbr, 0)
	qcow := h.qemuImg("base.qcow2", "-f", "qcow2")
	files := map[message.ItemHash]string{hashOf("raw"): raw, hashOf("qcow2"): qcow}
	l1 := h.layer("l1.qcow2", hashOf("raw"), "raw")
	files[hashOf("l1")] = l1
	l2 := h.layer("l2.qcow2", hashOf("l1"), "qcow2")
	files[hashOf("l2")] = l2
	l3 := h.layer("l3.qcow2", hashOf("l2"), "qcow2")
	overQCOW := h.layer("over-qcow2.qcow2", hashOf("qcow2"), "qcow2")
	wrongFormat := h.layer("wrong-format.qcow2", hashOf("raw"), "qcow2")
	unknown := h.layer("unknown.qcow2", hashOf("missing"), "raw")
	// A loop: a names b, b names a.
	loopA := h.layer("loop-a.qcow2", hashOf("loop-b"), "qcow2")
	loopB := h.layer("loop-b.qcow2", hashOf("loop-a"), "qcow2")
	files[hashOf("loop-a")], files[hashOf("loop-b")] = loopA, loopB
	// A layer whose parent names a host path.
	pathParent := h.qemuImg("path-parent.qcow2", "-f", "qcow2", "-F", "raw", "-b", raw)
	files[hashOf("path-parent")] = pathParent
	overPathParent := h.layer("over-path-parent.qcow2", hashOf("path-parent"), "qcow2")
	dataFile := h.qemuImg("layer-datafile.qcow2", "-f", "qcow2", "-o", "data_file="+h.path("data.raw"))
	testenv.Cmd(t, "qemu-img", "rebase", "-u", "-b", LayerBacking(hashOf("raw")), "-F", "raw", dataFile)
	badHash := h.layer("bad-hash.qcow2", "0xABC", "raw")

	errNotFound := errors.New("not in the store")
	resolve := func(_ context.Context, hash message.ItemHash) (string, error) {
		if p, ok := files[hash]; ok {
			return p, nil
		}
		return "", &Error{Status: 404, Msg: "item " + string(hash) + " not found", Kind: errNotFound}
	}
	for _, tc := range []struct {
		name     string
		path     string
		maxDepth int
		chain    []Image // empty: refused
		status   int
		why      string
	}{
		{"raw base", raw, 0, []Image{{raw, "raw"}}, 0, ""},
		{"qcow2 base", qcow, 0, []Image{{qcow, "qcow2"}}, 0, ""},
		{"layer over raw", l1, 0, []Image{{l1, "qcow2"}, {raw, "raw"}}, 0, ""},
		{"layer over qcow2", overQCOW, 0, []Image{{overQCOW, "qcow2"}, {qcow, "qcow2"}}, 0, ""},
		{"three layers", l3, 3, []Image{{l3, "qcow2"}, {l2, "qcow2"}, {l1, "qcow2"}, {raw, "raw"}}, 0, ""},

		{"too deep", l3, 2, nil, 400, "more than 2 layers"},
		{"unknown hash", unknown, 0, nil, 404, "aleph://" + string(hashOf("missing"))},
		{"loop", loopA, 0, nil, 400, "a loop"},
		{"wrong backing format", wrongFormat, 0, nil, 400, `names aleph://` + string(hashOf("raw")) + ` as a "qcow2" image, and that image is raw`},
		{"parent naming a path", overPathParent, 0, nil, 400, `names a backing file ("` + raw + `")`},
		{"layer with a data file", dataFile, 0, nil, 400, "external data file"},
		{"not an item hash", badHash, 0, nil, 400, `names a backing file ("aleph://0xABC")`},
		{"plain path", h.qemuImg("path.qcow2", "-f", "qcow2", "-F", "raw", "-b", raw), 0, nil, 400, "names a backing file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			chain, err := InspectChain(ctx, tc.path, resolve, tc.maxDepth)
			if tc.chain != nil {
				if err != nil {
					t.Fatal(err)
				}
				if got := Images(chain); fmt.Sprint(got) != fmt.Sprint(tc.chain) {
					t.Errorf("chain %v, want %v", got, tc.chain)
				}
				return
			}
			var se *Error
			if !errors.As(err, &se) || se.Status != tc.status || !strings.Contains(err.Error(), tc.why) {
				t.Fatalf("got %v (%T), want a %d saying %q", err, err, tc.status, tc.why)
			}
		})
	}
}

// TestCreateOverlayOverLayer: the root disk over a layer names the layer
// by its path and format, and is made without opening the layer's parent
// (qemu-img could not: only the node resolves aleph://).
func TestCreateOverlayOverLayer(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	h := hostile{t, t.TempDir()}
	raw := h.bytes("base.img", nil, 0)
	l1 := h.layer("l1.qcow2", hashOf("raw"), "raw")
	root := h.path("rootfs.qcow2")
	ctx := context.Background()
	for range 2 { // idempotent
		if err := (Disks{}).CreateOverlay(ctx, Image{Path: l1, Format: FormatQCOW2}, root, 4); err != nil {
			t.Fatal(err)
		}
	}
	info, err := Inspect(ctx, Image{Path: root, Format: FormatQCOW2})
	if err != nil {
		t.Fatal(err)
	}
	if info.BackingFile != l1 || info.BackingFormat != FormatQCOW2 || info.VirtualSize != 4<<20 {
		t.Errorf("root disk over %q (%s), %d bytes", info.BackingFile, info.BackingFormat, info.VirtualSize)
	}
	path := h.qemuImg("path.qcow2", "-f", "qcow2", "-F", "raw", "-b", raw)
	if err := (Disks{}).CreateOverlay(ctx, Image{Path: path, Format: FormatQCOW2}, h.path("other.qcow2"), 4); !errors.Is(err, ErrImageRefused) {
		t.Errorf("over a parent naming a path: %v", err)
	}
	if _, err := os.Stat(h.path("other.qcow2")); !os.IsNotExist(err) {
		t.Errorf("disk made over a refused parent: %v", err)
	}
}
