package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/alephvm/alephvm/message"
)

// watchParts makes opts record the largest size a download's .part file
// reaches on disk: Progress runs after every write to it.
func watchParts(t *testing.T, dir string, opts *Options) *atomic.Int64 {
	t.Helper()
	var largest atomic.Int64
	tmp := filepath.Join(dir, "cache", "tmp")
	opts.Progress = func(p Progress) {
		st, err := os.Stat(filepath.Join(tmp, string(p.Item)+".part"))
		if err != nil {
			t.Errorf("progress without a .part: %v", err)
			return
		}
		if st.Size() != p.Done {
			t.Errorf(".part holds %d bytes, progress says %d", st.Size(), p.Done)
		}
		for cur := largest.Load(); st.Size() > cur && !largest.CompareAndSwap(cur, st.Size()); cur = largest.Load() {
		}
	}
	return &largest
}

func TestItemSizeLimit(t *testing.T) {
	const maxItem = 1 << 20
	big, small := randomBytes(t, 3<<20), randomBytes(t, 512<<10)
	cases := []struct {
		name     string
		data     []byte
		size     any // content.size; nil: none
		ipfs     bool
		noLength bool
		wantErr  error // nil: the fetch succeeds
		noGET    bool  // refused before asking for the file
	}{
		{"no size, length announced", big, nil, false, false, ErrTooLarge, false},
		{"no size, length unknown", big, nil, false, true, ErrTooLarge, false},
		{"negative size", big, -1, false, true, ErrTooLarge, false},
		{"absurd size", big, int64(1) << 62, false, true, ErrTooLarge, true},
		{"size over the maximum", big, 2 << 20, false, true, ErrTooLarge, true},
		{"more than the message says", big, 100000, false, true, ErrHashMismatch, false},
		{"IPFS raw file, no size", big, nil, true, true, ErrTooLarge, false},
		{"no size, within the maximum", small, nil, false, true, nil, false},
		{"negative size, within the maximum", small, -7, false, false, nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			core := newFakeCore(t)
			core.noLength = tc.noLength
			dir := t.TempDir()
			opts := Options{APIServer: core.URL, IPFSGateway: core.URL + "/ipfs", MaxItemSize: maxItem}
			largest := watchParts(t, dir, &opts)
			s := newTestStore(t, dir, opts)
			hash := message.SHA256Hex(tc.data)
			content := map[string]any{"item_hash": hash}
			if tc.ipfs {
				hash = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o" // no CAR: the gateway sends the raw file
				content = map[string]any{"item_hash": hash, "item_type": "ipfs"}
			}
			if tc.size != nil {
				content["size"] = tc.size
			}
			core.addFile(hash, tc.data)
			ref, raw := storeMessage(t, content)
			core.addMessage(ref, raw)

			item, err := s.Fetch(context.Background(), ref, false)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				checkItem(t, item, tc.data)
				item.Release()
				if largest.Load() != int64(len(tc.data)) {
					t.Errorf("the watch saw %d bytes written, want %d", largest.Load(), len(tc.data))
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			limit := int64(maxItem)
			if n, ok := tc.size.(int); ok && n >= 0 && n <= maxItem {
				limit = int64(n)
			}
			if got := largest.Load(); got > limit {
				t.Errorf("%d bytes written to disk, more than the %d limit", got, limit)
			}
			if hits := core.fileHits(hash); tc.noGET != (hits == 0) {
				t.Errorf("%d requests for the file", hits)
			}
			checkClean(t, s)
		})
	}
}

// Blocks for hand-made DAGs.

func rawBlock(t *testing.T, data []byte) (cid.Cid, []byte) {
	t.Helper()
	c, err := cid.V1Builder{Codec: cid.Raw, MhType: multihash.SHA2_256}.Sum(data)
	if err != nil {
		t.Fatal(err)
	}
	return c, data
}

func pbBlock(t *testing.T, block []byte) (cid.Cid, []byte) {
	t.Helper()
	c, err := cid.V1Builder{Codec: cid.DagProtobuf, MhType: multihash.SHA2_256}.Sum(block)
	if err != nil {
		t.Fatal(err)
	}
	return c, block
}

// fileNodeOf is a dag-pb file node of links, each said to hold size bytes.
func fileNodeOf(links []cid.Cid, size uint64) []byte {
	sizes := make([]uint64, len(links))
	for i := range sizes {
		sizes[i] = size
	}
	return pbNode(links, unixfsData(nil, size*uint64(len(links)), sizes))
}

func repeat(c cid.Cid, n int) []cid.Cid {
	out := make([]cid.Cid, n)
	for i := range out {
		out[i] = c
	}
	return out
}

// carHeader starts a CARv1 stream of root.
func carHeader(root cid.Cid) []byte {
	rootBytes := append([]byte{0}, root.Bytes()...)
	header := append([]byte{0xa2, 0x65}, "roots"...)
	header = append(header, 0x81, 0xd8, 0x2a, 0x58, byte(len(rootBytes)))
	header = append(header, rootBytes...)
	header = append(append(header, 0x67), "version"...)
	header = append(header, 0x01)
	return append(binary.AppendUvarint(nil, uint64(len(header))), header...)
}

func appendSection(out []byte, c cid.Cid, data []byte) []byte {
	section := append(c.Bytes(), data...)
	return append(binary.AppendUvarint(out, uint64(len(section))), section...)
}

// carOf is a CAR stream of root holding the blocks given, in that order.
func carOf(root cid.Cid, blocks ...[]byte) []byte {
	out := carHeader(root)
	for i := 0; i+1 < len(blocks); i += 2 {
		c, err := cid.Cast(blocks[i])
		if err != nil {
			panic(err)
		}
		out = appendSection(out, c, blocks[i+1])
	}
	return out
}

func TestCARBomb(t *testing.T) {
	const maxItem = 1 << 20
	leaf, leafData := rawBlock(t, randomBytes(t, 64<<10))
	empty, err := cid.V1Builder{Codec: cid.Raw, MhType: multihash.IDENTITY}.Sum(nil)
	if err != nil {
		t.Fatal(err)
	}
	// 8000 links to one 64 KiB block: 500 MiB from a stream of 400 KiB
	// when the gateway sends each block once.
	fanout, fanoutData := pbBlock(t, fileNodeOf(repeat(leaf, 8000), 64<<10))
	lying, lyingData := pbBlock(t, fileNodeOf(repeat(leaf, 8000), 1))
	zeros, zerosData := pbBlock(t, fileNodeOf(repeat(empty, 8000), 0))
	mid, midData := pbBlock(t, fileNodeOf(repeat(leaf, 100), 64<<10))
	nested, nestedData := pbBlock(t, fileNodeOf(repeat(mid, 100), 100*64<<10))
	smallData := randomBytes(t, 200<<10)
	small, smallBlocks := buildUnixfs(t, smallData, 16<<10, 4, true)

	cases := []struct {
		name    string
		root    cid.Cid
		body    []byte
		dups    bool
		size    any
		wantErr bool
	}{
		{"fan-out", fanout, carOf(fanout, fanout.Bytes(), fanoutData, leaf.Bytes(), leafData), false, nil, true},
		{"fan-out, every duplicate sent", fanout, carOf(fanout, fanout.Bytes(), fanoutData, leaf.Bytes(), leafData, leaf.Bytes(), leafData), true, nil, true},
		{"fan-out, sizes that lie", lying, carOf(lying, lying.Bytes(), lyingData, leaf.Bytes(), leafData), false, nil, true},
		{"fan-out, the message says less", fanout, carOf(fanout, fanout.Bytes(), fanoutData, leaf.Bytes(), leafData), false, 100 << 10, true},
		{"links to nothing", zeros, carOf(zeros, zeros.Bytes(), zerosData), false, nil, true},
		{"nested fan-out", nested, carOf(nested, nested.Bytes(), nestedData, mid.Bytes(), midData, leaf.Bytes(), leafData), false, nil, true},
		{"an honest file", small, carStream(small, smallBlocks, false), false, nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			core := newFakeCore(t)
			dir := t.TempDir()
			opts := Options{APIServer: core.URL, IPFSGateway: core.URL + "/ipfs", MaxItemSize: maxItem}
			largest := watchParts(t, dir, &opts)
			s := newTestStore(t, dir, opts)
			core.addCAR(tc.root.String(), car{tc.body, tc.dups})
			content := map[string]any{"item_hash": tc.root.String(), "item_type": "ipfs"}
			if tc.size != nil {
				content["size"] = tc.size
			}
			ref, raw := storeMessage(t, content)
			core.addMessage(ref, raw)
			item, err := s.Fetch(context.Background(), ref, false)
			if !tc.wantErr {
				if err != nil {
					t.Fatal(err)
				}
				checkItem(t, item, smallData)
				item.Release()
				if largest.Load() != int64(len(smallData)) {
					t.Errorf("the watch saw %d bytes written, want %d", largest.Load(), len(smallData))
				}
				return
			}
			if err == nil {
				item.Release()
				t.Fatal("a CAR bomb was accepted")
			}
			t.Log(err)
			if got := largest.Load(); got > maxItem {
				t.Errorf("%d bytes written to disk, more than the %d limit", got, maxItem)
			}
			if n := core.fileHits(tc.root.String()); n != 1 {
				t.Errorf("%d requests: a refused DAG was asked for again", n)
			}
			checkClean(t, s)
		})
	}
}

// countingWriter counts what the CAR reader writes.
type countingWriter struct{ n int64 }

func (w *countingWriter) Write(b []byte) (int, error) { w.n += int64(len(b)); return len(b), nil }

func TestDAGBounds(t *testing.T) {
	leaf, leafData := rawBlock(t, []byte("0123456789"))
	chain := []cid.Cid{leaf}
	body := [][]byte{leaf.Bytes(), leafData}
	for range 10 {
		c, data := pbBlock(t, fileNodeOf(chain[len(chain)-1:], 10))
		chain = append(chain, c)
		body = append([][]byte{c.Bytes(), data}, body...)
	}
	deep := chain[len(chain)-1]
	wide, wideData := pbBlock(t, fileNodeOf(repeat(leaf, 100), 10))
	wideBody := [][]byte{wide.Bytes(), wideData}
	for range 100 {
		wideBody = append(wideBody, leaf.Bytes(), leafData)
	}
	junk := bytes.Repeat([]byte{'x'}, 2<<20)
	padded, paddedData := pbBlock(t, field(field(nil, 2, field(field(nil, 1, leaf.Bytes()), 2, junk)), 1, unixfsData(nil, 10, []uint64{10})))
	badSize, badSizeData := pbBlock(t, pbNode([]cid.Cid{leaf}, unixfsData(nil, 11, []uint64{10})))
	noSizes, noSizesData := pbBlock(t, pbNode([]cid.Cid{leaf}, unixfsData(nil, 10, nil)))

	cases := []struct {
		name    string
		root    cid.Cid
		body    []byte
		limits  func(*dagLimits)
		wantErr error // nil: any error
	}{
		{"deeper than allowed", deep, carOf(deep, body...), func(l *dagLimits) { l.depth = 5 }, ErrTooLarge},
		{"more links than allowed", wide, carOf(wide, wideBody...), func(l *dagLimits) { l.links = 10 }, ErrTooLarge},
		{"more blocks than allowed", wide, carOf(wide, wideBody...), func(l *dagLimits) { l.blocks = 50 }, ErrTooLarge},
		{"more blocks waiting than allowed", wide, carOf(wide, wideBody...), func(l *dagLimits) { l.pending = 50 }, ErrTooLarge},
		{"larger than allowed", wide, carOf(wide, wideBody...), func(l *dagLimits) { l.size = 999 }, ErrTooLarge},
		{"padding besides the file", padded, carOf(padded, padded.Bytes(), paddedData, leaf.Bytes(), leafData), func(l *dagLimits) { l.overhead = 1 << 20 }, ErrTooLarge},
		{"filesize that lies", badSize, carOf(badSize, badSize.Bytes(), badSizeData, leaf.Bytes(), leafData), nil, nil},
		{"links without blocksizes", noSizes, carOf(noSizes, noSizes.Bytes(), noSizesData, leaf.Bytes(), leafData), nil, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			limits := testLimits(1 << 20)
			if tc.limits != nil {
				tc.limits(&limits)
			}
			var w countingWriter
			_, err := writeVerifiedCAR(bytes.NewReader(tc.body), tc.root, true, &w, limits)
			if err == nil || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if w.n > limits.size {
				t.Errorf("%d bytes written, more than %d", w.n, limits.size)
			}
		})
	}
	// Within the same bounds, the same DAGs pass.
	for _, ok := range []struct {
		root cid.Cid
		body []byte
		size int64
	}{{deep, carOf(deep, body...), 10}, {wide, carOf(wide, wideBody...), 1000}} {
		var w countingWriter
		if _, err := writeVerifiedCAR(bytes.NewReader(ok.body), ok.root, true, &w, testLimits(1<<20)); err != nil || w.n != ok.size {
			t.Errorf("%s: %d bytes, %v", ok.root, w.n, err)
		}
	}
}

// hostileCARs are malformed CAR streams for root, each to be refused
// without a large allocation.
func hostileCARs(t testing.TB, root cid.Cid, good []byte) map[string][]byte {
	header := carHeader(root)
	cbor, unknownHash := oddCIDs(t)
	return map[string][]byte{
		"empty":                          nil,
		"truncated header length":        {0x80},
		"overflowing header length":      bytes.Repeat([]byte{0xff}, 11),
		"huge header length":             binary.AppendUvarint(nil, 1<<40),
		"header cut short":               binary.AppendUvarint(nil, 1<<20),
		"truncated section length":       append(slicesClone(header), 0x80),
		"huge section length":            binary.AppendUvarint(slicesClone(header), 1<<62),
		"section length past a block":    binary.AppendUvarint(slicesClone(header), maxBlockSize+1),
		"section cut short":              append(binary.AppendUvarint(slicesClone(header), maxBlockSize), 1, 2, 3),
		"empty section":                  append(slicesClone(header), 0),
		"section of a broken CID":        append(slicesClone(header), 2, 0x01, 0xff),
		"section of an unknown codec":    appendSection(slicesClone(header), cbor, []byte("x")),
		"section of an unknown hash":     appendSection(slicesClone(header), unknownHash, nil),
		"good stream cut short":          good[:len(good)-5],
		"good stream with a flipped bit": flipLastByte(good),
	}
}

// oddCIDs are a CID of a codec that is not UnixFS (dag-cbor), and a raw
// CID of a hash no one knows.
func oddCIDs(t testing.TB) (cid.Cid, cid.Cid) {
	cbor, err := cid.V1Builder{Codec: cid.DagCBOR, MhType: multihash.SHA2_256}.Sum([]byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	mh, err := multihash.Encode(make([]byte, 32), 0x300001)
	if err != nil {
		t.Fatal(err)
	}
	return cbor, cid.NewCidV1(cid.Raw, mh)
}

func slicesClone(b []byte) []byte { return append([]byte(nil), b...) }

func flipLastByte(b []byte) []byte {
	b = slicesClone(b)
	b[len(b)-1] ^= 1
	return b
}

func TestCARHostileInputs(t *testing.T) {
	data := randomBytes(t, 5000)
	root, blocks := buildUnixfs(t, data, 1024, 4, true)
	good := carStream(root, blocks, true)
	var w countingWriter
	if _, err := writeVerifiedCAR(bytes.NewReader(good), root, true, &w, testLimits(1<<20)); err != nil || w.n != int64(len(data)) {
		t.Fatalf("the good stream: %d bytes, %v", w.n, err)
	}
	for name, body := range hostileCARs(t, root, good) {
		var err error
		alloc := allocated(func() {
			_, err = writeVerifiedCAR(bytes.NewReader(body), root, true, &countingWriter{}, testLimits(1<<20))
		})
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
		if alloc > 512<<10 {
			t.Errorf("%s: %d KiB allocated to refuse it (%v)", name, alloc>>10, err)
		}
	}

	// Roots that cannot name a file are refused before anything is read.
	cbor, unknownHash := oddCIDs(t)
	for _, bad := range []cid.Cid{cbor, unknownHash} {
		r := &countingReader{r: bytes.NewReader(good)}
		if _, err := writeVerifiedCAR(r, bad, true, &countingWriter{}, testLimits(1<<20)); err == nil || r.n != 0 {
			t.Errorf("root %s: %v after reading %d bytes", bad, err, r.n)
		}
		if _, err := ipfsRoot(bad.String()); err == nil {
			t.Errorf("an IPFS item named %s is accepted", bad)
		}
	}
}

type countingReader struct {
	r interface{ Read([]byte) (int, error) }
	n int
}

func (r *countingReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	r.n += n
	return n, err
}

// allocated is how many bytes fn allocates.
func allocated(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// FuzzCARReader: whatever the stream, the reader ends without panicking,
// writes at most its limit, and when it accepts a stream, writes exactly
// the file the root names.
func FuzzCARReader(f *testing.F) {
	data := bytes.Repeat([]byte("fuzz me "), 1000)
	root, blocks := buildUnixfs(f, data, 512, 4, true)
	good := carStream(root, blocks, true)
	f.Add(good, true)
	f.Add(carStream(root, blocks, false), false)
	for _, body := range hostileCARs(f, root, good) {
		f.Add(body, true)
	}
	f.Fuzz(func(t *testing.T, body []byte, dups bool) {
		var out bytes.Buffer
		limits := testLimits(int64(len(data)))
		_, err := writeVerifiedCAR(bytes.NewReader(body), root, dups, &out, limits)
		if int64(out.Len()) > limits.size {
			t.Fatalf("%d bytes written, limit %d", out.Len(), limits.size)
		}
		if err == nil && !bytes.Equal(out.Bytes(), data) {
			t.Fatalf("accepted a stream that makes %d other bytes", out.Len())
		}
	})
}

// A node the gateway sends once and the DAG links many times is decoded
// once: padding in it must not cost its length at every visit.
func TestCARNodeDecodedOnce(t *testing.T) {
	leaf, leafData := rawBlock(t, []byte("x"))
	var padding []byte
	for range 32 << 10 {
		padding = varintField(padding, 7, 1) // an unknown field, two bytes
	}
	padded, paddedData := pbBlock(t, append(pbNode([]cid.Cid{leaf}, unixfsData(nil, 1, []uint64{1})), padding...))
	root, rootData := pbBlock(t, fileNodeOf(repeat(padded, 8000), 1))
	body := carOf(root, root.Bytes(), rootData, padded.Bytes(), paddedData, leaf.Bytes(), leafData)
	var w countingWriter
	st, err := writeVerifiedCAR(bytes.NewReader(body), root, false, &w, testLimits(1<<20))
	if err != nil || w.n != 8000 {
		t.Fatalf("%d bytes, %v", w.n, err)
	}
	if st.decoded > st.read {
		t.Errorf("decoded %d bytes of nodes from a stream of %d", st.decoded, st.read)
	}
}
