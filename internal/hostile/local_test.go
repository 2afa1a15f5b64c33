package hostile

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alephvm/alephvm/aggregate"
	"github.com/alephvm/alephvm/config"
	"github.com/alephvm/alephvm/storage"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Images.

// image makes a base image in a directory of the row's (DIR in its
// arguments): made by qemu-img create with args, of 1 MiB, or from its
// first bytes; patch, if set, rewrites bytes of it.
type image struct {
	qemuImg []string
	head    []byte
	patch   map[int64][]byte
}

func (im image) make(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "image")
	if im.qemuImg != nil {
		args := []string{"create", "-q"}
		for _, a := range im.qemuImg {
			args = append(args, strings.ReplaceAll(a, "DIR", dir))
		}
		args = append(args, p, "1M")
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %q: %v: %s", args, err, out)
		}
	} else if err := os.WriteFile(p, append(bytes.Clone(im.head), make([]byte, 64<<10)...), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off, b := range im.patch {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func imageRows() []row {
	img := func(input string, im image) row {
		r := row{category: "Images", input: input, target: "`storage.InspectParent`", run: func(t *testing.T) answer {
			dir := t.TempDir()
			p := im.make(t, dir)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := storage.InspectParent(ctx, p)
			var se *storage.Error
			if err != nil && (!errors.As(err, &se) || se.HTTPStatus() != 400) {
				t.Errorf("refused without a 400: %v", err)
			}
			a := refusedErr(t, err)
			a.text = "400 " + a.text
			return a
		}}
		if im.qemuImg != nil {
			r.needs = "qemu-img"
		}
		return r
	}
	qcow2 := func(args ...string) []string { return append([]string{"-f", "qcow2"}, args...) }
	return []row{
		img("a qcow2 whose backing file is `/etc/shadow`", image{qemuImg: qcow2("-u", "-F", "raw", "-b", "/etc/shadow")}),
		img("a qcow2 whose backing file is `json:{…\"filename\":\"/etc/shadow\"}`", image{qemuImg: qcow2("-u", "-F", "raw", "-b", `json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}`)}),
		img("a qcow2 whose backing file is an NBD socket", image{qemuImg: qcow2("-u", "-F", "raw", "-b", "nbd+unix:///x?socket=/run/alephvm/x.sock")}),
		img("a qcow2 version 2 whose backing file is `/var/lib/alephvm/alephvm.sqlite3`", image{qemuImg: qcow2("-o", "compat=0.10", "-u", "-F", "raw", "-b", "/var/lib/alephvm/alephvm.sqlite3")}),
		img("a qcow2 that keeps its data in an external data file", image{qemuImg: qcow2("-o", "data_file=DIR/data.raw")}),
		img("a qcow2 with AES encryption", image{qemuImg: qcow2(), patch: map[int64][]byte{32: {0, 0, 0, 1}}}),
		img("a qcow2 marked corrupt", image{qemuImg: qcow2(), patch: map[int64][]byte{72: be64(1 << 1)}}),
		img("a qcow2 with an unknown incompatible feature", image{qemuImg: qcow2(), patch: map[int64][]byte{72: be64(1 << 40)}}),
		img("a qcow2 whose backing file name runs past the first cluster", image{qemuImg: qcow2(), patch: map[int64][]byte{8: append(be64(65530), 0, 0, 0, 100)}}),
		img("a qcow2 header cut after 8 bytes", image{head: []byte("QFI\xfb\x00\x00\x00\x03")}),
		img("a qcow (version 1) image", image{head: []byte("QFI\xfb\x00\x00\x00\x01")}),
		img("a vmdk descriptor whose extent is `/etc/shadow`", image{head: []byte("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/shadow\" 0\n")}),
		img("a vmdk made by qemu-img", image{qemuImg: []string{"-f", "vmdk"}}),
		img("a vhdx made by qemu-img", image{qemuImg: []string{"-f", "vhdx"}}),
		img("a LUKS header", image{head: []byte("LUKS\xba\xbe\x00\x01")}),
	}
}

// compressedRows are compressed base images as storage.Unpack meets them,
// unpacking for a 64 MiB root disk.
func compressedRows() []row {
	zeros := make([]byte, 256<<20)
	gz := func(data []byte) []byte {
		var b bytes.Buffer
		w := gzip.NewWriter(&b)
		w.Write(data)
		w.Close()
		return b.Bytes()
	}
	xzOf := func(data []byte) []byte {
		var b bytes.Buffer
		w, _ := xz.NewWriter(&b)
		w.Write(data)
		w.Close()
		return b.Bytes()
	}
	zst := func(data []byte) []byte {
		var b bytes.Buffer
		w, _ := zstd.NewWriter(&b)
		w.Write(data)
		w.Close()
		return b.Bytes()
	}
	flip := func(b []byte) []byte {
		b = bytes.Clone(b)
		b[len(b)/2] ^= 0xff
		return b
	}
	disk := make([]byte, 1<<20)
	for i := range disk {
		disk[i] = byte(i * 31 >> 4)
	}
	unpack := func(input string, data func() []byte) row {
		return row{category: "Images", input: input, target: "`storage.Unpack`", run: func(t *testing.T) answer {
			dir := t.TempDir()
			src := filepath.Join(dir, "image")
			if err := os.WriteFile(src, data(), 0o644); err != nil {
				t.Fatal(err)
			}
			c, err := storage.DetectCompression(src)
			if err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, "out")
			if err := os.Mkdir(out, 0o755); err != nil {
				t.Fatal(err)
			}
			// What the unpacking allocates, not the making of the input.
			feed(func() { err = storage.Unpack(context.Background(), src, c, filepath.Join(out, "disk"), 64<<20) })
			checkEmptyDir(t, out)
			a := refusedErr(t, err)
			a.text = strings.TrimPrefix(a.text, "unpack "+src+": ")
			return a
		}}
	}
	return []row{
		unpack("a gzip image of 256 MiB of zeros (256 KiB) for a 64 MiB disk", func() []byte { return gz(zeros) }),
		unpack("an xz image of 256 MiB of zeros (40 KiB) for a 64 MiB disk", func() []byte { return xzOf(zeros) }),
		unpack("a zstd image of 256 MiB of zeros for a 64 MiB disk", func() []byte { return zst(zeros) }),
		unpack("a gzip image cut in the middle", func() []byte { b := gz(disk); return b[:len(b)/2] }),
		unpack("an xz image with a byte flipped", func() []byte { return flip(xzOf(disk)) }),
		unpack("a zstd image with a byte flipped", func() []byte { return flip(zst(disk)) }),
	}
}

// Aggregates.

func aggregateRows() []row {
	const owner = "0x101d8D16372dBf5f1614adaE95Ee5CCE61998Fc9"
	rowOf := func(input, target string, body func(w http.ResponseWriter), do func(c *aggregate.Client) answer) row {
		return row{category: "Aggregates", input: input, target: target, run: func(t *testing.T) answer {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { body(w) }))
			defer srv.Close()
			c := aggregate.New(aggregate.Options{APIServer: srv.URL,
				Client: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}})
			return do(c)
		}}
	}
	grants := func(c *aggregate.Client) (bool, error) {
		return c.Grants(context.Background(), owner, "0x63fac9201494f0bd17b9892b9fae4d52fe3bd377", "INSTANCE")
	}
	return []row{
		{category: "Aggregates", input: "a security aggregate answer of 2 MiB", target: "`aggregate.Client.Grants`", run: func(t *testing.T) answer {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				fmt.Fprintf(w, `{"data":{"security":{"authorizations":[%s{}]}}}`, strings.Repeat(`{"address":"0x63fac9201494f0bd17b9892b9fae4d52fe3bd377"},`, 2<<20/60))
			}))
			defer srv.Close()
			c := aggregate.New(aggregate.Options{APIServer: srv.URL, Client: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}})
			ok, err := grants(c)
			if ok {
				t.Error("granted")
			}
			return refusedErr(t, err)
		}},
		rowOf("a security aggregate that is not JSON", "`aggregate.Client.Grants`", func(w http.ResponseWriter) {
			w.Write([]byte("<html>maintenance</html>"))
		}, func(c *aggregate.Client) answer {
			ok, err := grants(c)
			if ok {
				return answer{kind: refused, text: "GRANTED"}
			}
			return answer{kind: refused, text: fmt.Sprint(err)}
		}),
		rowOf("a security aggregate whose authorizations are numbers, strings and objects without an address", "`aggregate.Client.Grants`", func(w http.ResponseWriter) {
			w.Write([]byte(`{"data":{"security":{"authorizations":[1,"0x63fac9201494f0bd17b9892b9fae4d52fe3bd377",{"types":["INSTANCE"]},{"address":5}]}}}`))
		}, func(c *aggregate.Client) answer {
			ok, err := grants(c)
			if ok || err != nil {
				return answer{kind: refused, text: fmt.Sprintf("GRANTED %v %v", ok, err)}
			}
			return harmlessAnswer("nothing granted, no error: entries of other shapes grant nothing")
		}),
		rowOf("a port-forwarding aggregate asking for 10 000 ports, and ports 0, 70000, -1 and `ssh`", "`aggregate.Client.PortForwarding`", func(w http.ResponseWriter) {
			var b strings.Builder
			for p := 1; p <= 10000; p++ {
				fmt.Fprintf(&b, `"%d":{"tcp":true},`, p)
			}
			fmt.Fprintf(w, `{"data":{"port-forwarding":{"%s":{"ports":{%s"0":{"tcp":true},"70000":{"tcp":true},"-1":{"udp":true},"ssh":{"tcp":true}}}}}}`, ownedRef, b.String())
		}, func(c *aggregate.Client) answer {
			ports, err := c.PortForwarding(context.Background(), owner, string(ownedRef))
			if err != nil || len(ports) > 64 {
				return answer{kind: refused, text: fmt.Sprintf("%d PORTS %v", len(ports), err)}
			}
			return harmlessAnswer("%d ports kept (ports %d to %d), the others and the entries that are not ports left out", len(ports), ports[0].Port, ports[len(ports)-1].Port)
		}),
		rowOf("a port-forwarding aggregate answered with 500", "`aggregate.Client.PortForwarding`", func(w http.ResponseWriter) {
			http.Error(w, "oops", http.StatusInternalServerError)
		}, func(c *aggregate.Client) answer {
			_, err := c.PortForwarding(context.Background(), owner, string(ownedRef))
			return answer{kind: refused, text: fmt.Sprint(err)}
		}),
	}
}

// Volume names.

func volumeNameRows() []row {
	names := []struct{ input, name string }{
		{"`../../etc/passwd`", "../../etc/passwd"},
		{"`..`", ".."},
		{"a NUL byte and a newline", "a\x00b\nc"},
		{"`a/b` beside `a%2Fb`", "a/b"},
		{"`unnamed.0` beside an unnamed volume", "unnamed.0"},
		{"10 000 bytes", strings.Repeat("v", 10000)},
		{"`données` (UTF-8)", "données"},
	}
	var rows []row
	for _, n := range names {
		rows = append(rows, row{category: "Volume names", input: n.input, target: "`storage.VolumeFileName`", run: func(t *testing.T) answer {
			got := storage.VolumeFileName(n.name, 0)
			if got == "" || got == "." || got == ".." || strings.ContainsAny(got, "/\x00\n") || len(got) > 200 {
				t.Fatalf("file name %q", got)
			}
			// Names the row puts beside it must get another file.
			for _, other := range []struct {
				name  string
				index int
			}{{"a%2Fb", 0}, {"", 0}, {"a_b", 0}, {strings.Repeat("v", 9999), 0}} {
				if other.name != n.name && storage.VolumeFileName(other.name, other.index) == got {
					t.Fatalf("%q and %q share the file %q", n.name, other.name, got)
				}
			}
			return harmlessAnswer("file name %q", shortName(got))
		}})
	}
	return rows
}

func shortName(s string) string {
	if len(s) > 80 {
		return s[:40] + "…" + s[len(s)-20:]
	}
	return s
}

// Settings.

func settingRows() []row {
	env := func(input string, vars ...string) row {
		return row{category: "Settings", input: input, target: "`config.Load`", run: func(t *testing.T) answer {
			empty := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(empty, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := config.Load(empty, vars)
			return refusedErr(t, err)
		}}
	}
	file := func(input, yaml string) row {
		return row{category: "Settings", input: input, target: "`config.Load` (config file)", run: func(t *testing.T) answer {
			p := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(p, []byte(yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := config.Load(p, nil)
			a := refusedErr(t, err)
			a.text = strings.ReplaceAll(a.text, p, "FILE")
			return a
		}}
	}
	return []row{
		env("`ALEPH_VM_SUPERVISOR_PORT=99999`", "ALEPH_VM_SUPERVISOR_PORT=99999"),
		env("`ALEPH_VM_REUSE_TIMEOUT=NaN`", "ALEPH_VM_REUSE_TIMEOUT=NaN"),
		env("`ALEPH_VM_HTTP_READ_TIMEOUT=1e300`", "ALEPH_VM_HTTP_READ_TIMEOUT=1e300"),
		env("`ALEPH_VM_INIT_TIMEOUT=-1`", "ALEPH_VM_INIT_TIMEOUT=-1"),
		env("`ALEPH_VM_ALLOCATION_SIGNATURE_MAX_AGE_SECONDS=0`", "ALEPH_VM_ALLOCATION_SIGNATURE_MAX_AGE_SECONDS=0"),
		env("`ALEPH_VM_CACHE_MAX_SIZE=NaN`", "ALEPH_VM_CACHE_MAX_SIZE=NaN"),
		env("`ALEPH_VM_STORE_MAX_ITEM_SIZE=9223372036854775807`", "ALEPH_VM_STORE_MAX_ITEM_SIZE=9223372036854775807"),
		env("`ALEPH_VM_CACHE_MIN_FREE_SPACE=-1GiB`", "ALEPH_VM_CACHE_MIN_FREE_SPACE=-1GiB"),
		env("`ALEPH_VM_GUEST_ALLOWED_NETWORKS=0.0.0.0/0`", "ALEPH_VM_GUEST_ALLOWED_NETWORKS=0.0.0.0/0"),
		env("`ALEPH_VM_QEMU_RUNAS=0:0`", "ALEPH_VM_QEMU_RUNAS=0:0"),
		env("`ALEPH_VM_WEBSOCKET_ALLOWED_ORIGINS=*`", "ALEPH_VM_WEBSOCKET_ALLOWED_ORIGINS=*"),
		env("`ALEPH_VM_DNS_NAMESERVERS=$(reboot)`", "ALEPH_VM_DNS_NAMESERVERS=$(reboot)"),
		env("`ALEPH_VM_EXECUTION_ROOT=var/lib`", "ALEPH_VM_EXECUTION_ROOT=var/lib"),
		file("a config file with an unknown key", "supervisor_port: 4020\nallow_root: true\n"),
		file("a config file of nested aliases (a YAML bomb)", yamlBomb()),
	}
}

// yamlBomb is the "billion laughs" of YAML, nine levels of nine aliases,
// as the value of a setting the node reads.
func yamlBomb() string {
	var b strings.Builder
	b.WriteString("dns_nameservers:\n  - &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n")
	for c := 'b'; c <= 'i'; c++ {
		p := string(c - 1)
		fmt.Fprintf(&b, "  - &%c [*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s]\n", c, p, p, p, p, p, p, p, p, p)
	}
	return b.String()
}
