package store

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"mime"
	"strings"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
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

// writeVerifiedCAR reads a CARv1 stream holding the UnixFS file root in
// depth-first order, checks each block against the CID that names it, and
// writes the file's bytes to w in order.
func writeVerifiedCAR(r io.Reader, root cid.Cid, dups bool, w io.Writer) error {
	br := bufio.NewReaderSize(r, 1<<20)
	headerLen, err := binary.ReadUvarint(br)
	if err != nil {
		return carReadError(err)
	}
	if headerLen == 0 || headerLen > 1<<20 {
		return fmt.Errorf("CAR header of %d bytes", headerLen)
	}
	if _, err := br.Discard(int(headerLen)); err != nil {
		return carReadError(err)
	}
	cache := map[cid.Cid][]byte{}
	cached := 0
	buf := make([]byte, maxBlockSize)
	stack := []cid.Cid{root}
	for len(stack) > 0 {
		want := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		data, err := nextBlock(br, buf, want, dups, cache)
		if err != nil {
			return err
		}
		if !dups && cached+len(data) <= maxDupCache {
			if _, ok := cache[want]; !ok {
				cache[want] = append([]byte(nil), data...)
				cached += len(data)
			}
		}
		switch want.Type() {
		case cid.Raw:
			if _, err := w.Write(data); err != nil {
				return err
			}
		case cid.DagProtobuf:
			inline, links, err := decodeFileNode(data)
			if err != nil {
				return fmt.Errorf("block %s: %w", want, err)
			}
			if _, err := w.Write(inline); err != nil {
				return err
			}
			for i := len(links) - 1; i >= 0; i-- {
				stack = append(stack, links[i])
			}
		default:
			return fmt.Errorf("block %s: codec 0x%x is not part of a UnixFS file", want, want.Type())
		}
	}
	return nil
}

// nextBlock returns the block want names: inlined in an identity CID, kept
// from earlier (when the gateway sends no duplicates), or the next one in
// the stream, which must be it and must hash to it.
func nextBlock(br *bufio.Reader, buf []byte, want cid.Cid, dups bool, cache map[cid.Cid][]byte) ([]byte, error) {
	if want.Prefix().MhType == multihash.IDENTITY {
		dec, err := multihash.Decode(want.Hash())
		if err != nil {
			return nil, fmt.Errorf("block %s: %w", want, err)
		}
		return dec.Digest, nil
	}
	if data, ok := cache[want]; ok && !dups {
		return data, nil
	}
	size, err := binary.ReadUvarint(br)
	if err != nil {
		return nil, carReadError(err)
	}
	if size == 0 || size > uint64(len(buf)) {
		return nil, fmt.Errorf("CAR section of %d bytes, more than a block may hold", size)
	}
	section := buf[:size]
	if _, err := io.ReadFull(br, section); err != nil {
		return nil, carReadError(err)
	}
	n, got, err := cid.CidFromBytes(section)
	if err != nil {
		return nil, fmt.Errorf("CAR section: %w", err)
	}
	if !got.Equals(want) {
		return nil, fmt.Errorf("%w: the gateway sent block %s where the file goes on with %s", ErrHashMismatch, got, want)
	}
	data := section[n:]
	sum, err := want.Prefix().Sum(data)
	if err != nil {
		return nil, fmt.Errorf("block %s: %w", want, err)
	}
	if !sum.Equals(want) {
		return nil, fmt.Errorf("%w: block %s hashes to %s", ErrHashMismatch, want, sum)
	}
	return data, nil
}

func carReadError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errCARTruncated
	}
	return err
}

// decodeFileNode reads a dag-pb node of a UnixFS file: the bytes it holds
// itself, then its children in order.
func decodeFileNode(block []byte) (inline []byte, links []cid.Cid, err error) {
	var unixfs []byte
	hasData := false
	err = protoFields(block, func(num int, _ uint64, b []byte) error {
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
				links = append(links, c)
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	if !hasData {
		return nil, nil, errors.New("dag-pb node without UnixFS data")
	}
	typ := uint64(1<<64 - 1)
	err = protoFields(unixfs, func(num int, v uint64, b []byte) error {
		switch num {
		case 1:
			typ = v
		case 2:
			inline = b
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("UnixFS data: %w", err)
	}
	if typ != unixfsFile && typ != unixfsRaw {
		return nil, nil, fmt.Errorf("UnixFS node of type %d: not a file (a directory cannot be a volume)", typ)
	}
	return inline, links, nil
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
	return c, nil
}
