package kernelimage

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// lz4LegacyMagic starts the LZ4 legacy frame format, which the kernel's
// build (lz4 -l) uses for compressed kernels.
var lz4LegacyMagic = []byte{0x02, 0x21, 0x4c, 0x18}

// lz4LegacyBlock is the uncompressed size of every block but the last.
const lz4LegacyBlock = 8 << 20

// decodeLZ4Legacy decompresses an LZ4 legacy frame: the magic, then
// blocks of a 4-byte little-endian compressed size and the compressed
// block. The kernel's build appends the uncompressed size (4 bytes) after
// the last block; a size that does not fit what is left ends the frame.
func decodeLZ4Legacy(in []byte) ([]byte, error) {
	var out []byte
	for pos := 0; pos+4 <= len(in); {
		n := int(binary.LittleEndian.Uint32(in[pos:]))
		pos += 4
		if n == int(binary.LittleEndian.Uint32(lz4LegacyMagic)) {
			continue // concatenated frames
		}
		if n > len(in)-pos {
			if pos == 4 {
				return nil, errors.New("lz4: first block is truncated")
			}
			break // the appended uncompressed size
		}
		var err error
		out, err = decodeLZ4Block(in[pos:pos+n], out, lz4LegacyBlock)
		if err != nil {
			return nil, fmt.Errorf("lz4 block at %d: %w", pos-4, err)
		}
		pos += n
	}
	if len(out) == 0 {
		return nil, errors.New("lz4: no data")
	}
	return out, nil
}

// decodeLZ4Block appends the decompressed LZ4 block src to dst, checking
// that it is at most limit bytes.
func decodeLZ4Block(src, dst []byte, limit int) ([]byte, error) {
	base := len(dst)
	for i := 0; i < len(src); {
		token := src[i]
		i++
		var lit, match int
		var err error
		lit, i, err = lz4Length(src, i, int(token>>4))
		if err != nil {
			return nil, fmt.Errorf("literal length: %w", err)
		}
		if i+lit > len(src) {
			return nil, errors.New("literals overrun the block")
		}
		dst = append(dst, src[i:i+lit]...)
		i += lit
		if i == len(src) {
			break // the last sequence has literals only
		}
		if i+2 > len(src) {
			return nil, errors.New("truncated match offset")
		}
		offset := int(binary.LittleEndian.Uint16(src[i:]))
		i += 2
		match, i, err = lz4Length(src, i, int(token&15))
		if err != nil {
			return nil, fmt.Errorf("match length: %w", err)
		}
		match += 4
		if offset == 0 || offset > len(dst)-base {
			return nil, fmt.Errorf("match offset %d out of range", offset)
		}
		if len(dst)-base+match > limit {
			return nil, errors.New("block larger than its limit")
		}
		from := len(dst) - offset
		if offset >= match {
			dst = append(dst, dst[from:from+match]...)
			continue
		}
		for k := range match { // byte by byte: the match overlaps its own output
			dst = append(dst, dst[from+k])
		}
	}
	if len(dst)-base > limit {
		return nil, errors.New("block larger than its limit")
	}
	return dst, nil
}

// lz4Length reads the rest of a length whose 4-bit part in the token is
// n: when n is 15, bytes follow and add up until one is not 255.
func lz4Length(src []byte, i, n int) (int, int, error) {
	if n != 15 {
		return n, i, nil
	}
	for {
		if i >= len(src) {
			return 0, i, errors.New("truncated")
		}
		b := src[i]
		i++
		n += int(b)
		if b != 255 {
			return n, i, nil
		}
	}
}
