package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alephvm/alephvm/internal/testenv"
)

// hostile makes the images a base image could be, in dir: name -> path.
type hostile struct {
	t   *testing.T
	dir string
}

func (h hostile) path(name string) string { return filepath.Join(h.dir, name) }

// qemuImg makes name with qemu-img create args, and a size of 1 MiB
// unless it has a backing file to take it from.
func (h hostile) qemuImg(name string, args ...string) string {
	h.t.Helper()
	p := h.path(name)
	args = append(append([]string{"create", "-q"}, args...), p)
	if !slices.Contains(args, "-b") || slices.Contains(args, "-u") {
		args = append(args, "1M")
	}
	testenv.Cmd(h.t, "qemu-img", args...)
	return p
}

// bytes makes name from its first bytes, padded to 1 MiB.
func (h hostile) bytes(name string, head []byte, at int64) string {
	h.t.Helper()
	p := h.path(name)
	f, err := os.Create(p)
	if err != nil {
		h.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(head, at); err != nil {
		h.t.Fatal(err)
	}
	if err := f.Truncate(1 << 20); err != nil {
		h.t.Fatal(err)
	}
	return p
}

// patch rewrites bytes of a file at off.
func (h hostile) patch(p string, off int64, b []byte) string {
	h.t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		h.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		h.t.Fatal(err)
	}
	return p
}

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// TestInspectParent: the base images the node accepts (raw, and qcow2
// standing alone, bitmaps included) and those it refuses with a 400 that
// says why: a backing file (a host path, a json: or protocol name, a FIFO
// that would hang whoever opens it), an external data file, encryption,
// corruption, unknown features, other formats that name files of their
// own (a vmdk descriptor) and malformed headers. Nothing an image names
// is opened: the FIFOs would block the inspection.
func TestInspectParent(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	h := hostile{t, t.TempDir()}
	secret := h.path("shadow")
	if err := os.WriteFile(secret, []byte("root:$y$secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := h.path("fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	mbr := make([]byte, 512)
	mbr[510], mbr[511] = 0x55, 0xaa

	plain := h.qemuImg("plain.qcow2", "-f", "qcow2")
	withBitmap := h.qemuImg("bitmap.qcow2", "-f", "qcow2")
	testenv.Cmd(t, "qemu-img", "bitmap", "--add", withBitmap, "dirty0")
	dataFile := h.qemuImg("datafile.qcow2", "-f", "qcow2", "-o", "data_file="+h.path("data.raw"))
	dataFileFIFO := h.qemuImg("datafile-fifo.qcow2", "-f", "qcow2", "-o", "data_file="+h.path("data-fifo.raw"))
	os.Remove(h.path("data-fifo.raw"))
	syscall.Mkfifo(h.path("data-fifo.raw"), 0o600)
	// The data file's name in a header extension, without the feature bit.
	dataExtOnly := h.patch(h.qemuImg("dataext.qcow2", "-f", "qcow2", "-o", "data_file="+h.path("data2.raw")), 72, be64(0))
	corrupt := h.patch(h.qemuImg("corrupt.qcow2", "-f", "qcow2"), 72, be64(1<<1))
	unknownFeature := h.patch(h.qemuImg("unknown.qcow2", "-f", "qcow2"), 72, be64(1<<40))
	// A backing file without its format: the extension that names it
	// becomes one QEMU does not know.
	noFormat := h.qemuImg("backing-noformat.qcow2", "-f", "qcow2", "-u", "-F", "raw", "-b", secret)
	head, _ := os.ReadFile(noFormat)
	at := bytes.Index(head[:4096], []byte{0xe2, 0x79, 0x2a, 0xca})
	h.patch(noFormat, int64(at), []byte{0x0b, 0xad, 0xf0, 0x0d})
	// The first header extension (QEMU's feature name table) made the
	// full disk encryption header's (LUKS in qcow2, slow to make for real).
	lukset := h.qemuImg("luks.qcow2", "-f", "qcow2")
	h.patch(lukset, 112, []byte{0x05, 0x37, 0xbe, 0x77})
	// A backing file name that runs past the first cluster.
	badBacking := h.patch(h.qemuImg("badbacking.qcow2", "-f", "qcow2"), 8, append(be64(65530), 0, 0, 0, 100))

	for _, tc := range []struct {
		name, path, format string
		why                string // empty: accepted
	}{
		{"raw", h.bytes("raw.img", mbr, 0), "raw", ""},
		{"empty raw", h.bytes("empty.img", nil, 0), "raw", ""},
		{"qcow2", plain, "qcow2", ""},
		{"qcow2 version 2", h.qemuImg("v2.qcow2", "-f", "qcow2", "-o", "compat=0.10"), "qcow2", ""},
		{"qcow2 with a bitmap", withBitmap, "qcow2", ""},

		{"backing host file", h.qemuImg("backing.qcow2", "-f", "qcow2", "-F", "raw", "-b", secret), "", `names a backing file ("` + secret + `")`},
		{"backing, version 2", h.qemuImg("backing-v2.qcow2", "-f", "qcow2", "-o", "compat=0.10", "-F", "raw", "-b", secret), "", "names a backing file"},
		{"backing without format", noFormat, "", "names a backing file"},
		{"backing FIFO", h.qemuImg("backing-fifo.qcow2", "-f", "qcow2", "-u", "-F", "raw", "-b", fifo), "", "names a backing file"},
		{"backing json:", h.qemuImg("backing-json.qcow2", "-f", "qcow2", "-u", "-F", "raw", "-b",
			`json:{"driver":"raw","file":{"driver":"file","filename":"`+secret+`"}}`), "", `names a backing file ("json:`},
		{"backing nbd:", h.qemuImg("backing-nbd.qcow2", "-f", "qcow2", "-u", "-F", "raw", "-b", "nbd+unix:///x?socket=/run/x.sock"), "", "names a backing file"},
		{"backing name past the first cluster", badBacking, "", "not a valid qcow2 header"},
		{"external data file", dataFile, "", `external data file ("` + h.path("data.raw") + `")`},
		{"external data file, a FIFO", dataFileFIFO, "", "external data file"},
		{"raw external data file", h.qemuImg("datafile-raw.qcow2", "-f", "qcow2", "-o", "data_file="+h.path("data3.raw")+",data_file_raw=on"), "", "external data file"},
		{"data file name without its feature bit", dataExtOnly, "", "external data file"},
		{"encrypted (AES)", h.patch(h.qemuImg("aes.qcow2", "-f", "qcow2"), 32, []byte{0, 0, 0, 1}), "", "encrypted"},
		{"encrypted (LUKS header extension)", lukset, "", "encrypted"},
		{"corrupt", corrupt, "", "marked corrupt"},
		{"unknown incompatible feature", unknownFeature, "", "unknown incompatible features"},
		{"truncated qcow2 header", h.bytes("truncated.qcow2", []byte("QFI\xfb\x00\x00\x00\x03"), 0), "", "not a valid qcow2 header"},
		{"qcow version 1", h.bytes("v1.qcow", []byte("QFI\xfb\x00\x00\x00\x01"), 0), "", "qcow (version 1)"},
		{"vmdk descriptor naming a host file", h.bytes("desc.vmdk", []byte("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \""+secret+"\" 0\n"), 0), "", "vmdk"},
		{"vmdk", h.qemuImg("sparse.vmdk", "-f", "vmdk"), "", "vmdk"},
		{"vhdx", h.qemuImg("disk.vhdx", "-f", "vhdx"), "", "vhdx"},
		{"vpc", h.qemuImg("disk.vhd", "-f", "vpc"), "", "vpc"},
		{"vdi", h.qemuImg("disk.vdi", "-f", "vdi"), "", "vdi"},
		{"qed", h.qemuImg("disk.qed", "-f", "qed"), "", "qed"},
		{"luks", h.bytes("disk.luks", []byte("LUKS\xba\xbe\x00\x01"), 0), "", "luks"},
		{"parallels", h.qemuImg("disk.parallels", "-f", "parallels"), "", "parallels"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			info, err := InspectParent(ctx, tc.path)
			if tc.why == "" {
				if err != nil || info.Format != tc.format || info.VirtualSize == 0 && tc.name != "empty raw" {
					t.Fatalf("refused: %+v %v", info, err)
				}
				return
			}
			if ctx.Err() != nil {
				t.Fatalf("inspection blocked: it opened what the image names (%v)", err)
			}
			var se *Error
			if !errors.Is(err, ErrImageRefused) || !errors.As(err, &se) || se.HTTPStatus() != 400 {
				t.Fatalf("not refused with a 400: %+v %v", info, err)
			}
			if !strings.Contains(err.Error(), tc.why) {
				t.Errorf("refusal %q does not say %q", err, tc.why)
			}
		})
	}
}

// TestDetectFormatIsExplicit: a raw image is raw whatever QEMU's prober
// would make of its content once inside a VM, because the node never
// detects the format of a disk again: Inspect takes the format it is told.
func TestInspectTakesTheFormatItIsTold(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	h := hostile{t, t.TempDir()}
	secret := h.path("secret")
	os.WriteFile(secret, []byte("secret"), 0o600)
	img := h.qemuImg("looks-qcow2.raw", "-f", "qcow2", "-F", "raw", "-b", secret)
	info, err := Inspect(context.Background(), Image{Path: img, Format: FormatRaw})
	if err != nil || info.Format != FormatRaw || info.BackingFile != "" || info.Standalone() != nil {
		t.Errorf("%+v %v", info, err)
	}
	if _, err := Inspect(context.Background(), Image{Path: img, Format: "vmdk"}); err == nil {
		t.Error("opened an image as vmdk")
	}
}

// TestCreateOverlayRefusesParents: CreateOverlay checks its parent itself,
// and leaves nothing behind when it refuses one.
func TestCreateOverlayRefusesParents(t *testing.T) {
	testenv.RequireTools(t, "qemu-img")
	h := hostile{t, t.TempDir()}
	secret := h.path("secret")
	os.WriteFile(secret, make([]byte, 1<<20), 0o600)
	for name, parent := range map[string]string{
		"backing":   h.qemuImg("backing.qcow2", "-f", "qcow2", "-F", "raw", "-b", secret),
		"data file": h.qemuImg("data.qcow2", "-f", "qcow2", "-o", "data_file="+h.path("data.raw")),
	} {
		disk := h.path(name + "-rootfs.qcow2")
		err := (Disks{}).CreateOverlay(context.Background(), Image{Path: parent, Format: FormatQCOW2}, disk, 64)
		if !errors.Is(err, ErrImageRefused) {
			t.Errorf("%s: %v", name, err)
		}
		for _, p := range []string{disk, disk + ".tmp"} {
			if _, err := os.Lstat(p); err == nil {
				t.Errorf("%s: %s left behind", name, p)
			}
		}
	}
}

// FuzzParseQCOW2Header: no header, however hostile, panics the parser or
// makes it read outside the first cluster.
func FuzzParseQCOW2Header(f *testing.F) {
	hdr := make([]byte, 112)
	copy(hdr, "QFI\xfb\x00\x00\x00\x03")
	binary.BigEndian.PutUint32(hdr[20:], 16)
	binary.BigEndian.PutUint32(hdr[100:], 104)
	f.Add(hdr)
	withExt := append([]byte{}, hdr...)
	withExt = append(withExt[:104], 0x44, 0x41, 0x54, 0x41, 0, 0, 0, 5, 'a', 'b', 'c', 'd', 'e', 0, 0, 0)
	f.Add(withExt)
	f.Add([]byte("QFI\xfb\x00\x00\x00\x02"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := boundedReader{b, 1 << 21}
		_, _ = parseQCOW2Header(r)
	})
}

// boundedReader reads b, zeros after it up to limit, and fails a test that
// reads past limit.
type boundedReader struct {
	b     []byte
	limit int64
}

func (r boundedReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > r.limit {
		panic("read outside the first cluster")
	}
	clear(p)
	if off < int64(len(r.b)) {
		copy(p, r.b[off:])
	}
	return len(p), nil
}
