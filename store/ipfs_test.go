package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
)

// buildUnixfs builds the UnixFS DAG of data as ipfs add lays it out
// (balanced, chunks of chunk bytes, at most fanout links a node): with
// CIDv0, dag-pb leaves; with CIDv1, raw leaves. It returns the root and
// the blocks by CID.
func buildUnixfs(t testing.TB, data []byte, chunk, fanout int, v1 bool) (cid.Cid, map[cid.Cid][]byte) {
	t.Helper()
	blocks := map[cid.Cid][]byte{}
	put := func(codec uint64, block []byte) cid.Cid {
		var c cid.Cid
		var err error
		if v1 {
			c, err = cid.V1Builder{Codec: codec, MhType: multihash.SHA2_256}.Sum(block)
		} else {
			c, err = cid.V0Builder{}.Sum(block)
		}
		if err != nil {
			t.Fatal(err)
		}
		blocks[c] = block
		return c
	}
	type node struct {
		c    cid.Cid
		size uint64 // bytes of the file below it
	}
	var level []node
	for off := 0; off < len(data) || off == 0; off += chunk {
		piece := data[off:min(off+chunk, len(data))]
		if v1 {
			level = append(level, node{put(cid.Raw, piece), uint64(len(piece))})
		} else {
			level = append(level, node{put(cid.DagProtobuf, pbNode(nil, unixfsData(piece, uint64(len(piece)), nil))), uint64(len(piece))})
		}
		if len(data) == 0 {
			break
		}
	}
	for len(level) > 1 {
		var up []node
		for i := 0; i < len(level); i += fanout {
			kids := level[i:min(i+fanout, len(level))]
			var links []cid.Cid
			var sizes []uint64
			var total uint64
			for _, k := range kids {
				links, sizes, total = append(links, k.c), append(sizes, k.size), total+k.size
			}
			up = append(up, node{put(cid.DagProtobuf, pbNode(links, unixfsData(nil, total, sizes))), total})
		}
		level = up
	}
	return level[0].c, blocks
}

func field(b []byte, num int, payload []byte) []byte {
	b = binary.AppendUvarint(b, uint64(num<<3|2))
	b = binary.AppendUvarint(b, uint64(len(payload)))
	return append(b, payload...)
}

func varintField(b []byte, num int, v uint64) []byte {
	return binary.AppendUvarint(binary.AppendUvarint(b, uint64(num<<3)), v)
}

// pbNode encodes a dag-pb node canonically: links first, then data.
func pbNode(links []cid.Cid, data []byte) []byte {
	var b []byte
	for _, l := range links {
		b = field(b, 2, varintField(field(field(nil, 1, l.Bytes()), 2, nil), 3, 0))
	}
	return field(b, 1, data)
}

func unixfsData(data []byte, filesize uint64, blocksizes []uint64) []byte {
	b := varintField(nil, 1, unixfsFile)
	if data != nil {
		b = field(b, 2, data)
	}
	b = varintField(b, 3, filesize)
	for _, s := range blocksizes {
		b = varintField(b, 4, s)
	}
	return b
}

// carStream writes root's DAG as a CARv1 stream in depth-first order,
// with or without repeating duplicate blocks.
func carStream(root cid.Cid, blocks map[cid.Cid][]byte, dups bool) []byte {
	rootBytes := append([]byte{0}, root.Bytes()...)
	header := append([]byte{0xa2, 0x65}, "roots"...)
	header = append(header, 0x81, 0xd8, 0x2a, 0x58, byte(len(rootBytes)))
	header = append(header, rootBytes...)
	header = append(append(header, 0x67), "version"...)
	header = append(header, 0x01)
	out := binary.AppendUvarint(nil, uint64(len(header)))
	out = append(out, header...)
	seen := map[cid.Cid]bool{}
	var walk func(c cid.Cid)
	walk = func(c cid.Cid) {
		if dups || !seen[c] {
			seen[c] = true
			section := append(c.Bytes(), blocks[c]...)
			out = binary.AppendUvarint(out, uint64(len(section)))
			out = append(out, section...)
		}
		if c.Type() == cid.DagProtobuf {
			node, _ := decodeFileNode(blocks[c])
			for _, l := range node.links {
				walk(l)
			}
		}
	}
	walk(root)
	return out
}

func TestUnixfsBuilderMatchesIPFS(t *testing.T) {
	// echo "hello world" | ipfs add
	root, _ := buildUnixfs(t, []byte("hello world\n"), 262144, 174, false)
	if root.String() != "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o" {
		t.Errorf("root %s", root)
	}
}

func TestIPFSVerified(t *testing.T) {
	// Zero runs make duplicate blocks, as in any disk image.
	data := append(randomBytes(t, 50000), make([]byte, 40000)...)
	data = append(data, randomBytes(t, 12345)...)
	cases := []struct {
		name    string
		v1      bool
		dups    bool
		corrupt bool
		wantErr error
	}{
		{"CIDv1 raw leaves", true, true, false, nil},
		{"CIDv0 dag-pb leaves", false, true, false, nil},
		{"gateway without duplicates", true, false, false, nil},
		{"corrupt block", true, true, true, ErrHashMismatch},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			core := newFakeCore(t)
			s := newTestStore(t, t.TempDir(), Options{IPFSGateway: core.URL + "/ipfs"})
			root, blocks := buildUnixfs(t, data, 1024, 4, tc.v1)
			core.addCAR(root.String(), car{carStream(root, blocks, tc.dups), tc.dups})
			if tc.corrupt {
				core.sabotaged, core.corrupt = 99, true
			}
			ref, raw := storeMessage(t, map[string]any{"item_hash": root.String(), "item_type": "ipfs", "size": len(data)})
			if _, err := s.AddMessage(context.Background(), raw); err != nil {
				t.Fatal(err)
			}
			item, err := s.Fetch(context.Background(), ref, false)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				checkClean(t, s)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer item.Release()
			checkItem(t, item, data)
			if !item.Verified {
				t.Error("not reported verified")
			}
		})
	}
}

func TestIPFSTruncatedCARIsRetried(t *testing.T) {
	core := newFakeCore(t)
	s := newTestStore(t, t.TempDir(), Options{IPFSGateway: core.URL + "/ipfs"})
	data := randomBytes(t, 100000)
	root, blocks := buildUnixfs(t, data, 4096, 8, true)
	core.addCAR(root.String(), car{carStream(root, blocks, true), true})
	core.sabotaged, core.cutAt = 1, 50000
	ref, raw := storeMessage(t, map[string]any{"item_hash": root.String(), "item_type": "ipfs"})
	core.addMessage(ref, raw)
	s.AddMessage(context.Background(), raw)
	item, err := s.Fetch(context.Background(), ref, false)
	if err != nil {
		t.Fatal(err)
	}
	defer item.Release()
	checkItem(t, item, data)
	if !item.Verified || core.fileHits(root.String()) != 2 {
		t.Errorf("verified %v after %d requests", item.Verified, core.fileHits(root.String()))
	}
}

func TestDecodeFileNodeRefusesDirectories(t *testing.T) {
	dir := pbNode(nil, varintField(nil, 1, 1))
	if _, err := decodeFileNode(dir); err == nil {
		t.Error("a directory node was taken for a file")
	}
	if _, err := decodeFileNode([]byte{0xff}); err == nil {
		t.Error("garbage was taken for a node")
	}
	var sink bytes.Buffer
	root, blocks := buildUnixfs(t, []byte("x"), 10, 2, true)
	body := carStream(root, blocks, true)
	if _, err := writeVerifiedCAR(bytes.NewReader(body[:len(body)-1]), root, true, &sink, testLimits(1<<20)); !errors.Is(err, errCARTruncated) {
		t.Errorf("truncated CAR: %v", err)
	}
}

// testLimits are the default bounds of a download of at most size bytes.
func testLimits(size int64) dagLimits {
	return dagLimitsFor(size, func(n int64) error { return fmt.Errorf("%w: %d bytes", ErrTooLarge, n) })
}
