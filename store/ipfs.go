package store

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"strings"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
	mhcore "github.com/multiformats/go-multihash/core"
)

// IPFS items are fetched from the gateway as a CAR stream (the trustless
// gateway format: application/vnd.ipld.car, blocks in depth-first order),
// so that every block can be checked against its CID and the file
// reassembled from verified blocks only. A gateway that answers with the
// raw file instead is accepted, and the item recorded as unverified.

const (
	carContentType = "application/vnd.ipld.car"
	// carAccept asks for every block in traversal order, duplicates
	// included, so that the file streams through without keeping blocks.
	carAccept = carContentType + "; version=1; order=dfs; dups=y"
	// maxBlockSize bounds one block: IPFS moves blocks of at most 2 MiB.
	maxBlockSize = 4 << 20
	// maxDupCache bounds the blocks kept to serve duplicates when a
	// gateway sends each block once (dups=n): mostly a file's zero chunks.
	maxDupCache = 64 << 20
)

// UnixFS node types (unixfs.proto).
const (
	unixfsRaw  = 0
	unixfsFile = 2
)

// carSendsDups reports whether a CAR response holds duplicate blocks
// (dups=y); a response that does not say so is taken not to.
func carSendsDups(contentType string) bool {
	_, params, err := mime.ParseMediaType(contentType)
	return err == nil && params["dups"] == "y"
}

// isCAR reports whether a response is a CAR stream.
func isCAR(contentType string) bool {
	mt, _, err := mime.ParseMediaType(contentType)
	return err == nil && mt == carContentType
}

// errCARTruncated wraps io.ErrUnexpectedEOF: the stream ended before the
// file did, which a retry can mend.
var errCARTruncated = fmt.Errorf("CAR stream ends before the file: %w", io.ErrUnexpectedEOF)

// dagLimits bound what a DAG may make the store do. A CID names a DAG its
// author chose, so without them a few kilobytes of blocks (one node linking
// the same block a million times, nodes linking nodes that link nothing)
// could make the store write without end, spin, or fill its memory with
// blocks still to visit.
type dagLimits struct {
	size     int64 // file bytes
	tooLarge func(size int64) error
	blocks   int   // blocks visited, duplicates included
	depth    int   // links from the root to a leaf
	links    int   // links of one node
	pending  int   // blocks known but not visited yet
	overhead int64 // stream bytes that are not file bytes, beyond size/4
}

// dagLimitsFor are the bounds of a download that may write size bytes. A
// file that ipfs add (174 links a node, chunks of 256 KiB) or any common
// importer made, of up to a terabyte, is well within them.
func dagLimitsFor(size int64, tooLarge func(int64) error) dagLimits {
	return dagLimits{size: size, tooLarge: tooLarge, blocks: 1 << 23, depth: 64, links: 8192, pending: 1 << 16, overhead: 16 << 20}
}

// pendingBlock is a block the file goes on with: its CID, the file bytes
// its parent says it holds (-1 for the root), and its depth.
type pendingBlock struct {
	c     cid.Cid
	size  int64
	depth int
}

// carStats say what reading a CAR stream took.
type carStats struct {
	blocks  int   // blocks visited, duplicates included
	read    int64 // stream bytes
	decoded int64 // bytes of dag-pb nodes decoded
	written int64 // file bytes
}

// writeVerifiedCAR reads a CARv1 stream holding the UnixFS file root in
// depth-first order, checks each block against the CID that names it, and
// writes the file's bytes to w in order. As each node arrives it counts
// the bytes its DAG makes (UnixFS sizes, each checked against the blocks
// below when they arrive), so that a file larger than limits.size is
// refused before it is written, and it bounds the blocks, depth and links.
func writeVerifiedCAR(r io.Reader, root cid.Cid, dups bool, w io.Writer, limits dagLimits) (carStats, error) {
	var st carStats
	if err := checkCodec(root); err != nil {
		return st, err
	}
	br := bufio.NewReaderSize(r, 64<<10)
	out := bufio.NewWriterSize(w, 64<<10)
	headerLen, err := binary.ReadUvarint(br)
	if err != nil {
		return st, carReadError(err)
	}
	if headerLen == 0 || headerLen > 1<<20 {
		return st, fmt.Errorf("CAR header of %d bytes", headerLen)
	}
	if _, err := br.Discard(int(headerLen)); err != nil {
		return st, carReadError(err)
	}
	st.read = int64(headerLen)
	var (
		cache   = map[cid.Cid][]byte{} // blocks kept for duplicates the gateway leaves out
		decoded = map[cid.Cid]fileNode{}
		cached  = 0
		section bytes.Buffer // grows with what arrives, not with what a length prefix claims
		fileLen int64        = -1
		stack                = []pendingBlock{{c: root, size: -1}}
	)
	for len(stack) > 0 {
		want := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if st.blocks++; st.blocks > limits.blocks {
			return st, fmt.Errorf("%w: the DAG of %s has more than %d blocks", ErrTooLarge, root, limits.blocks)
		}
		data, n, err := nextBlock(br, &section, want.c, dups, cache)
		if err != nil {
			return st, err
		}
		if st.read += n; st.read-st.written > limits.overhead+max(fileLen, 0)/4 {
			return st, fmt.Errorf("%w: the CAR stream of %s holds %d bytes besides the file's %d", ErrTooLarge, root, st.read-st.written, max(fileLen, 0))
		}
		_, known := cache[want.c]
		if !dups && !known && cached+len(data) <= maxDupCache {
			data = append([]byte(nil), data...)
			cache[want.c] = data
			cached += len(data)
		}
		var inline []byte
		var kids []pendingBlock
		switch want.c.Type() {
		case cid.Raw:
			inline = data
		case cid.DagProtobuf:
			// A node sent once and visited again is decoded once: padding
			// in it would otherwise cost its length at every visit.
			node, ok := decoded[want.c]
			if !ok {
				st.decoded += int64(len(data))
				if node, err = decodeFileNode(data); err != nil {
					return st, fmt.Errorf("block %s: %w", want.c, err)
				}
				// Its links take about 60 bytes each once decoded.
				if _, kept := cache[want.c]; kept && cached+60*len(node.links) <= maxDupCache {
					decoded[want.c] = node
					cached += 60 * len(node.links)
				}
			}
			if kids, err = node.children(want, limits); err != nil {
				return st, fmt.Errorf("block %s: %w", want.c, err)
			}
			inline = node.data
		}
		size := int64(len(inline))
		for _, k := range kids {
			size += k.size // each at most limits.size: no overflow
		}
		switch {
		case want.size < 0 && size > limits.size:
			return st, limits.tooLarge(size)
		case want.size < 0:
			fileLen = size
		case size != want.size:
			return st, fmt.Errorf("block %s holds %d bytes of the file, its parent says %d", want.c, size, want.size)
		}
		if len(stack)+len(kids) > limits.pending {
			return st, fmt.Errorf("%w: the DAG of %s has more than %d blocks waiting at once", ErrTooLarge, root, limits.pending)
		}
		if _, err := out.Write(inline); err != nil {
			return st, err
		}
		st.written += int64(len(inline))
		for i := len(kids) - 1; i >= 0; i-- {
			stack = append(stack, kids[i])
		}
	}
	return st, out.Flush()
}

// checkCodec refuses a block that cannot be part of a UnixFS file, or
// whose hash cannot be checked, before it is read.
func checkCodec(c cid.Cid) error {
	if c.Type() != cid.Raw && c.Type() != cid.DagProtobuf {
		return fmt.Errorf("block %s: codec 0x%x is not part of a UnixFS file", c, c.Type())
	}
	if code := c.Prefix().MhType; code != multihash.IDENTITY {
		if _, err := mhcore.GetHasher(code); err != nil {
			return fmt.Errorf("block %s: hash 0x%x: %w", c, code, err)
		}
	}
	return nil
}

// nextBlock returns the block want names: inlined in an identity CID, kept
// from earlier (when the gateway sends no duplicates), or the next one in
// the stream, which must be it and must hash to it; and the stream bytes
// it took. The block is valid until the next call.
func nextBlock(br *bufio.Reader, section *bytes.Buffer, want cid.Cid, dups bool, cache map[cid.Cid][]byte) ([]byte, int64, error) {
	if want.Prefix().MhType == multihash.IDENTITY {
		dec, err := multihash.Decode(want.Hash())
		if err != nil {
			return nil, 0, fmt.Errorf("block %s: %w", want, err)
		}
		return dec.Digest, 0, nil
	}
	if data, ok := cache[want]; ok && !dups {
		return data, 0, nil
	}
	size, err := binary.ReadUvarint(br)
	if err != nil {
		return nil, 0, carReadError(err)
	}
	if size == 0 || size > maxBlockSize {
		return nil, 0, fmt.Errorf("CAR section of %d bytes, more than a block may hold", size)
	}
	section.Reset()
	if _, err := io.CopyN(section, br, int64(size)); err != nil {
		return nil, 0, carReadError(err)
	}
	n, got, err := cid.CidFromBytes(section.Bytes())
	if err != nil {
		return nil, 0, fmt.Errorf("CAR section: %w", err)
	}
	if !got.Equals(want) {
		return nil, 0, fmt.Errorf("%w: the gateway sent block %s where the file goes on with %s", ErrHashMismatch, got, want)
	}
	data := section.Bytes()[n:]
	sum, err := want.Prefix().Sum(data)
	if err != nil {
		return nil, 0, fmt.Errorf("block %s: %w", want, err)
	}
	if !sum.Equals(want) {
		return nil, 0, fmt.Errorf("%w: block %s hashes to %s", ErrHashMismatch, want, sum)
	}
	return data, int64(uvarintLen(size)) + int64(size), nil
}

func uvarintLen(v uint64) int {
	return len(binary.AppendUvarint(nil, v))
}

func carReadError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errCARTruncated
	}
	return err
}

// fileNode is a dag-pb node of a UnixFS file.
type fileNode struct {
	data       []byte // the file bytes it holds itself, before its children's
	links      []cid.Cid
	blocksizes []uint64 // the file bytes below each link
	filesize   uint64
	hasSize    bool
}

// decodeFileNode reads a dag-pb node of a UnixFS file.
func decodeFileNode(block []byte) (fileNode, error) {
	var node fileNode
	var unixfs []byte
	hasData := false
	err := protoFields(block, func(num int, _ uint64, b []byte) error {
		switch num {
		case 1: // Data
			unixfs, hasData = b, true
		case 2: // Links
			return protoFields(b, func(num int, _ uint64, b []byte) error {
				if num != 1 { // Hash; Name and Tsize do not matter here
					return nil
				}
				c, err := cid.Cast(b)
				if err != nil {
					return fmt.Errorf("link: %w", err)
				}
				node.links = append(node.links, c)
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return node, err
	}
	if !hasData {
		return node, errors.New("dag-pb node without UnixFS data")
	}
	typ := uint64(1<<64 - 1)
	err = protoFields(unixfs, func(num int, v uint64, b []byte) error {
		switch num {
		case 1:
			typ = v
		case 2:
			node.data = b
		case 3:
			node.filesize, node.hasSize = v, true
		case 4:
			node.blocksizes = append(node.blocksizes, v)
		}
		return nil
	})
	if err != nil {
		return node, fmt.Errorf("UnixFS data: %w", err)
	}
	if typ != unixfsFile && typ != unixfsRaw {
		return node, fmt.Errorf("UnixFS node of type %d: not a file (a directory cannot be a volume)", typ)
	}
	return node, nil
}

// children checks the node's sizes and links, as the UnixFS spec has
// them (one blocksize a link; filesize, if set, the sum of the node's
// bytes and its blocksizes) and within limits, and returns its children.
// A child of no bytes is refused: no legitimate file has one, and a DAG of
// them would make the store work without writing anything.
func (n fileNode) children(parent pendingBlock, limits dagLimits) ([]pendingBlock, error) {
	switch {
	case len(n.links) == 0 && len(n.blocksizes) == 0:
	case len(n.links) > limits.links:
		return nil, fmt.Errorf("%w: %d links, more than the %d a node may have", ErrTooLarge, len(n.links), limits.links)
	case len(n.links) != len(n.blocksizes):
		return nil, fmt.Errorf("%d links but %d blocksizes", len(n.links), len(n.blocksizes))
	case parent.depth+1 > limits.depth:
		return nil, fmt.Errorf("%w: the DAG is more than %d links deep", ErrTooLarge, limits.depth)
	}
	total := uint64(len(n.data))
	kids := make([]pendingBlock, len(n.links))
	for i, c := range n.links {
		size := n.blocksizes[i]
		if size == 0 {
			return nil, fmt.Errorf("link %d to %s holds no bytes of the file", i, c)
		}
		if size > uint64(limits.size) || total+size > uint64(limits.size) {
			return nil, limits.tooLarge(int64(min(total+size, math.MaxInt64)))
		}
		if err := checkCodec(c); err != nil {
			return nil, err
		}
		total += size
		kids[i] = pendingBlock{c: c, size: int64(size), depth: parent.depth + 1}
	}
	if n.hasSize && n.filesize != total {
		return nil, fmt.Errorf("UnixFS filesize %d, but its data and blocksizes make %d", n.filesize, total)
	}
	return kids, nil
}

// protoFields calls fn with each field of a protobuf message: its number,
// and its value (varints) or bytes (length-delimited). Fixed-size fields
// are skipped.
func protoFields(b []byte, fn func(num int, v uint64, bytes []byte) error) error {
	for len(b) > 0 {
		key, n := binary.Uvarint(b)
		if n <= 0 {
			return errors.New("malformed protobuf key")
		}
		b = b[n:]
		num := int(key >> 3)
		var v uint64
		var field []byte
		switch key & 7 {
		case 0:
			if v, n = binary.Uvarint(b); n <= 0 {
				return errors.New("malformed protobuf varint")
			}
			b = b[n:]
		case 2:
			l, n := binary.Uvarint(b)
			if n <= 0 || l > uint64(len(b)-n) {
				return errors.New("malformed protobuf length")
			}
			field, b = b[n:n+int(l)], b[n+int(l):]
		case 1, 5:
			size := map[uint64]int{1: 8, 5: 4}[key&7]
			if len(b) < size {
				return errors.New("truncated protobuf field")
			}
			b = b[size:]
			continue
		default:
			return fmt.Errorf("protobuf wire type %d", key&7)
		}
		if err := fn(num, v, field); err != nil {
			return err
		}
	}
	return nil
}

// ipfsRoot parses the CID an IPFS item is named by.
func ipfsRoot(hash string) (cid.Cid, error) {
	c, err := cid.Decode(strings.TrimSpace(hash))
	if err != nil {
		return cid.Undef, fmt.Errorf("IPFS item %s: %w", hash, err)
	}
	if err := checkCodec(c); err != nil {
		return cid.Undef, fmt.Errorf("IPFS item %s: %w", hash, err)
	}
	return c, nil
}
