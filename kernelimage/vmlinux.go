// Package kernelimage reads Linux kernel images: it takes the
// uncompressed kernel (an ELF vmlinux, which Firecracker boots) out of a
// bzImage (which QEMU and bootloaders boot).
package kernelimage

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// bzImage setup header fields (Linux boot protocol, Documentation/x86/boot.rst).
const (
	setupSectsOffset    = 0x1f1
	headerMagicOffset   = 0x202
	bootVersionOffset   = 0x206
	payloadOffsetOffset = 0x248
	payloadLengthOffset = 0x24c
)

// ExtractVmlinux returns the uncompressed kernel (an ELF file) inside a
// bzImage, as Firecracker needs it. Debian's cloud kernel is compressed
// with LZ4; gzip is handled too.
func ExtractVmlinux(bz []byte) ([]byte, error) {
	if len(bz) < 0x250 || string(bz[headerMagicOffset:headerMagicOffset+4]) != "HdrS" {
		return nil, errors.New("not a bzImage: no HdrS setup header")
	}
	if v := binary.LittleEndian.Uint16(bz[bootVersionOffset:]); v < 0x208 {
		return nil, fmt.Errorf("boot protocol %#x has no payload fields (want 2.08 or later)", v)
	}
	setupSects := int(bz[setupSectsOffset])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(bz[payloadOffsetOffset:]))
	length := int(binary.LittleEndian.Uint32(bz[payloadLengthOffset:]))
	if start < 0 || length <= 0 || start+length > len(bz) {
		return nil, fmt.Errorf("payload at %d+%d is outside the %d-byte image", start, length, len(bz))
	}
	payload := bz[start : start+length]
	var out []byte
	var err error
	switch {
	case bytes.HasPrefix(payload, lz4LegacyMagic):
		out, err = decodeLZ4Legacy(payload)
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		var zr *gzip.Reader
		if zr, err = gzip.NewReader(bytes.NewReader(payload)); err == nil {
			zr.Multistream(false)
			out, err = io.ReadAll(zr)
		}
	default:
		return nil, fmt.Errorf("kernel payload compressed with an unsupported method (magic % x): use an LZ4 or gzip kernel such as linux-image-cloud-amd64", payload[:min(6, len(payload))])
	}
	if err != nil {
		return nil, fmt.Errorf("decompress kernel payload: %w", err)
	}
	if !bytes.HasPrefix(out, []byte("\x7fELF")) {
		return nil, errors.New("the kernel payload is not an ELF file")
	}
	return out, nil
}
