package hostile

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/alephvm/alephvm/db"
	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/hypervisor/qemu"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/store"
)

// maxItem is STORE_MAX_ITEM_SIZE in these rows.
const maxItem = 1 << 20

// storeRig is a content store whose core node API and IPFS gateway are
// one fake server, answering what a row gives it.
type storeRig struct {
	store *store.Store
	dir   string
	mux   *http.ServeMux
	url   string
}

func newStoreRig(t *testing.T, free int64) *storeRig {
	t.Helper()
	dir := t.TempDir()
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	log := slog.New(slog.DiscardHandler)
	database, err := db.Open(context.Background(), filepath.Join(dir, "node.sqlite3"), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { database.Close() })
	opts := store.Options{
		Root: filepath.Join(dir, "cache"), DB: database, Log: log,
		APIServer: srv.URL, IPFSGateway: srv.URL + "/ipfs",
		MaxItemSize: maxItem, MinFreeSpace: 2 << 30, Attempts: 2, Backoff: time.Millisecond,
		FreeSpace: func(string) (int64, error) { return free, nil },
		Client:    &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DisableCompression: true}},
	}
	s, err := store.Open(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return &storeRig{store: s, dir: dir, mux: mux, url: srv.URL}
}

const plentyFree = 1 << 40

// message serves raw as the API's answer for hash.
func (r *storeRig) message(hash message.ItemHash, raw []byte) {
	r.answer("/api/v0/messages/"+string(hash), func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"status":"processed","item_hash":%q,"message":%s}`, hash, raw)
	})
}

func (r *storeRig) answer(path string, h http.HandlerFunc) { r.mux.HandleFunc("GET "+path, h) }

// fetch fetches ref, and checks that a refusal left nothing in the store.
func (r *storeRig) fetch(t *testing.T, ref message.ItemHash) answer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var item *store.Item
	var err error
	feed(func() { item, err = r.store.Fetch(ctx, ref, false) })
	if err == nil {
		item.Release()
	}
	for _, sub := range []string{"tmp", "files"} {
		checkEmptyDir(t, filepath.Join(r.dir, "cache", sub))
	}
	return refusedErr(t, err)
}

// storeMessage is a STORE message of content, as the network holds it.
func storeMessage(t *testing.T, content map[string]any) (message.ItemHash, []byte) {
	t.Helper()
	content["address"], content["time"] = sender, 1700000000
	if content["item_type"] == nil {
		content["item_type"] = "storage"
	}
	return anyMessage(t, "STORE", content)
}

func anyMessage(t *testing.T, typ string, content map[string]any) (message.ItemHash, []byte) {
	t.Helper()
	doc, _ := json.Marshal(map[string]any{"chain": "ETH", "sender": sender, "type": typ, "signature": "0x00",
		"time": 1700000000, "item_type": "inline", "content": content})
	raw, err := message.Regenerate(doc)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := message.Parse(raw)
	if err != nil {
		t.Fatalf("the row's message does not validate: %v", err)
	}
	return msg.ItemHash, raw
}

// pattern is size deterministic bytes, so that hashes and answers stay
// the same from run to run.
func pattern(size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

// A file on the fake node: served at its sha256, with a STORE message.
func (r *storeRig) file(t *testing.T, data []byte, content map[string]any, serve http.HandlerFunc) message.ItemHash {
	t.Helper()
	sum := message.SHA256Hex(data)
	if content == nil {
		content = map[string]any{}
	}
	content["item_hash"] = sum
	if serve == nil {
		serve = func(w http.ResponseWriter, _ *http.Request) { w.Write(data) }
	}
	r.answer("/api/v0/storage/raw/"+sum, serve)
	ref, raw := storeMessage(t, content)
	r.message(ref, raw)
	return ref
}

// IPFS: dag-pb nodes and CAR streams made by hand.

func pbField(b []byte, num int, payload []byte) []byte {
	b = binary.AppendUvarint(b, uint64(num<<3|2))
	b = binary.AppendUvarint(b, uint64(len(payload)))
	return append(b, payload...)
}

func pbVarint(b []byte, num int, v uint64) []byte {
	return binary.AppendUvarint(binary.AppendUvarint(b, uint64(num<<3)), v)
}

// fileNode is a UnixFS node (type 2, file; 1, directory) linking links,
// each said to hold size bytes.
func fileNode(kind uint64, links []cid.Cid, size uint64) []byte {
	data := pbVarint(nil, 1, kind)
	data = pbVarint(data, 3, size*uint64(len(links)))
	for range links {
		data = pbVarint(data, 4, size)
	}
	var b []byte
	for _, l := range links {
		b = pbField(b, 2, pbVarint(pbField(pbField(nil, 1, l.Bytes()), 2, nil), 3, 0))
	}
	return pbField(b, 1, data)
}

func rawLeaf(t *testing.T, data []byte) cid.Cid {
	c, err := cid.V1Builder{Codec: cid.Raw, MhType: multihash.SHA2_256}.Sum(data)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// rootOf is the CIDv0 of a dag-pb root, the form IPFS item hashes take.
func rootOf(t *testing.T, block []byte) cid.Cid {
	c, err := cid.V0Builder{}.Sum(block)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// carStream is a CARv1 stream of root holding sections, each a CID and
// its block, in that order.
func carStream(root cid.Cid, sections ...any) []byte {
	rootBytes := append([]byte{0}, root.Bytes()...)
	header := append([]byte{0xa2, 0x65}, "roots"...)
	header = append(header, 0x81, 0xd8, 0x2a, 0x58, byte(len(rootBytes)))
	header = append(header, rootBytes...)
	header = append(append(header, 0x67), "version"...)
	header = append(header, 0x01)
	out := append(binary.AppendUvarint(nil, uint64(len(header))), header...)
	for i := 0; i+1 < len(sections); i += 2 {
		section := append(sections[i].(cid.Cid).Bytes(), sections[i+1].([]byte)...)
		out = append(binary.AppendUvarint(out, uint64(len(section))), section...)
	}
	return out
}

// ipfs serves body as the gateway's CAR answer for root, behind a STORE
// message without a size.
func (r *storeRig) ipfs(t *testing.T, root cid.Cid, body []byte, dups bool) message.ItemHash {
	t.Helper()
	r.answer("/ipfs/"+root.String(), func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", fmt.Sprintf("application/vnd.ipld.car; version=1; order=dfs; dups=%s", map[bool]string{true: "y", false: "n"}[dups]))
		w.Write(body)
	})
	ref, raw := storeMessage(t, map[string]any{"item_hash": root.String(), "item_type": "ipfs"})
	r.message(ref, raw)
	return ref
}

func archiveRows() []row {
	const target = "`store.Store.Fetch` of an IPFS item (a fake gateway)"
	car := func(input string, alloc uint64, build func(t *testing.T, r *storeRig) message.ItemHash) row {
		return row{category: "Archives", input: input, target: target, maxAllocMiB: alloc, run: func(t *testing.T) answer {
			r := newStoreRig(t, plentyFree)
			return r.fetch(t, build(t, r))
		}}
	}
	leafData := pattern(64 << 10)
	return []row{
		car("a CAR bomb: a root linking one 64 KiB block 8000 times (500 MiB), each block sent once", 0, func(t *testing.T, r *storeRig) message.ItemHash {
			leaf := rawLeaf(t, leafData)
			links := make([]cid.Cid, 8000)
			for i := range links {
				links[i] = leaf
			}
			block := fileNode(2, links, 64<<10)
			root := rootOf(t, block)
			return r.ipfs(t, root, carStream(root, root, block, leaf, leafData), false)
		}),
		car("the same bomb whose root says each link holds 1 byte", 0, func(t *testing.T, r *storeRig) message.ItemHash {
			leaf := rawLeaf(t, leafData)
			links := make([]cid.Cid, 8000)
			for i := range links {
				links[i] = leaf
			}
			block := fileNode(2, links, 1)
			root := rootOf(t, block)
			return r.ipfs(t, root, carStream(root, root, block, leaf, leafData), false)
		}),
		car("a block whose bytes are not those its CID names", 0, func(t *testing.T, r *storeRig) message.ItemHash {
			leaf := rawLeaf(t, leafData)
			block := fileNode(2, []cid.Cid{leaf}, 64<<10)
			root := rootOf(t, block)
			forged := bytes.Clone(leafData)
			forged[100] ^= 1
			return r.ipfs(t, root, carStream(root, root, block, leaf, forged), true)
		}),
		car("a UnixFS directory instead of a file", 0, func(t *testing.T, r *storeRig) message.ItemHash {
			leaf := rawLeaf(t, leafData)
			block := fileNode(1, []cid.Cid{leaf}, 64<<10)
			root := rootOf(t, block)
			return r.ipfs(t, root, carStream(root, root, block, leaf, leafData), true)
		}),
		car("a section whose length prefix says 2^62 bytes", 0, func(t *testing.T, r *storeRig) message.ItemHash {
			block := fileNode(2, nil, 0)
			root := rootOf(t, block)
			return r.ipfs(t, root, binary.AppendUvarint(carStream(root), 1<<62), true)
		}),
		car("a CAR header that says it is 1 TiB long", 0, func(t *testing.T, r *storeRig) message.ItemHash {
			block := fileNode(2, nil, 0)
			root := rootOf(t, block)
			return r.ipfs(t, root, binary.AppendUvarint(nil, 1<<40), true)
		}),
		car("a stream cut in the middle of a block, every time", 0, func(t *testing.T, r *storeRig) message.ItemHash {
			leaf := rawLeaf(t, leafData)
			block := fileNode(2, []cid.Cid{leaf}, 64<<10)
			root := rootOf(t, block)
			full := carStream(root, root, block, leaf, leafData)
			return r.ipfs(t, root, full[:len(full)-1000], true)
		}),
		{category: "Archives", input: "a program's code file that holds a qcow2 header naming `/etc/shadow` as its backing file",
			target: "`hypervisor/qemu.Args` (the drive QEMU gets)", run: func(t *testing.T) answer {
				code := "/var/cache/alephvm/files/" + message.SHA256Hex([]byte("code"))
				args, err := qemu.Args(hypervisor.Spec{Name: "vm", Dir: "/run/alephvm/vm", VCPUs: 1, MemoryMiB: 128,
					Boot: hypervisor.Boot{Kernel: "/k"}, Drives: []hypervisor.Drive{{Path: code, ReadOnly: true}}}, "tcg", "")
				if err != nil {
					t.Fatal(err)
				}
				for _, a := range args {
					if strings.Contains(a, code) {
						if !strings.Contains(a, `"driver":"raw"`) || strings.Contains(a, "backing") {
							t.Fatalf("drive %s", a)
						}
						return harmlessAnswer("opened as raw bytes whatever it holds, nothing it names followed: %s", strings.ReplaceAll(a, code, "FILE"))
					}
				}
				t.Fatalf("no drive in %q", args)
				return answer{}
			}},
	}
}

func downloadRows() []row {
	const target = "`store.Store.Fetch` (a fake core node API)"
	dl := func(input string, alloc uint64, free int64, build func(t *testing.T, r *storeRig) message.ItemHash) row {
		return row{category: "Downloads", input: input, target: target, maxAllocMiB: alloc, run: func(t *testing.T) answer {
			r := newStoreRig(t, free)
			return r.fetch(t, build(t, r))
		}}
	}
	big := pattern(3 << 20)
	return []row{
		dl("a STORE message without a size, naming a file of 3 MiB (`STORE_MAX_ITEM_SIZE` 1 MiB here)", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			return r.file(t, big, nil, func(w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "application/octet-stream")
				w.(http.Flusher).Flush() // no Content-Length: the store learns the size as bytes come
				w.Write(big)
			})
		}),
		dl("a STORE message whose size is -1, and a server announcing 3 MiB", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			return r.file(t, big, map[string]any{"size": -1}, nil)
		}),
		dl("a STORE message whose size is 2^62", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			return r.file(t, big, map[string]any{"size": int64(1) << 62}, func(w http.ResponseWriter, _ *http.Request) {
				t.Error("the file was asked for")
			})
		}),
		dl("a file whose bytes do not hash to its item hash", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			data := pattern(100 << 10)
			forged := bytes.Clone(data)
			forged[0] ^= 1
			return r.file(t, data, map[string]any{"size": len(data)}, func(w http.ResponseWriter, _ *http.Request) { w.Write(forged) })
		}),
		dl("a file longer than its STORE message says", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			data := pattern(100 << 10)
			return r.file(t, data, map[string]any{"size": 1000}, nil)
		}),
		dl("a download when the cache's filesystem has 1 GiB free (`CACHE_MIN_FREE_SPACE` 2 GiB)", 0, 1<<30, func(t *testing.T, r *storeRig) message.ItemHash {
			return r.file(t, pattern(1000), map[string]any{"size": 1000}, nil)
		}),
		dl("an API answer carrying another message than the one asked for", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			_, other := storeMessage(t, map[string]any{"item_hash": message.SHA256Hex([]byte("other"))})
			asked := message.ItemHash(message.SHA256Hex([]byte("asked")))
			r.message(asked, other)
			return asked
		}),
		dl("an API answer whose message does not validate", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			asked := message.ItemHash(message.SHA256Hex([]byte("asked")))
			r.message(asked, []byte(`{"type":"STORE","item_hash":"`+string(asked)+`"}`))
			return asked
		}),
		dl("an API answer of 64 MiB", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			asked := message.ItemHash(message.SHA256Hex([]byte("asked")))
			r.answer("/api/v0/messages/"+string(asked), func(w http.ResponseWriter, _ *http.Request) {
				io.WriteString(w, `{"status":"processed","message":"`)
				chunk := []byte(strings.Repeat("a", 1<<20))
				for range 64 {
					if _, err := w.Write(chunk); err != nil {
						return
					}
				}
			})
			return asked
		}),
		dl("an API that answers 500 every time", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			asked := message.ItemHash(message.SHA256Hex([]byte("asked")))
			r.answer("/api/v0/messages/"+string(asked), func(w http.ResponseWriter, _ *http.Request) {
				http.Error(w, "overloaded", http.StatusInternalServerError)
			})
			return asked
		}),
		dl("a ref naming a PROGRAM message where a STORE message is expected", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			raw := programMessage(t, func(map[string]any) {})
			msg, err := message.Parse(raw)
			if err != nil {
				t.Fatal(err)
			}
			r.message(msg.ItemHash, raw)
			return msg.ItemHash
		}),
		dl("a message the API says was forgotten", 0, plentyFree, func(t *testing.T, r *storeRig) message.ItemHash {
			ref, raw := storeMessage(t, map[string]any{"item_hash": message.SHA256Hex([]byte("gone"))})
			r.answer("/api/v0/messages/"+string(ref), func(w http.ResponseWriter, _ *http.Request) {
				fmt.Fprintf(w, `{"status":"forgotten","item_hash":%q,"message":%s}`, ref, raw)
			})
			return ref
		}),
	}
}
