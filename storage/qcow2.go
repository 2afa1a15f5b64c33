package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// qcow2Header is what a qcow2 header says of the image and of the files it
// asks for (docs/interop/qcow2.txt in QEMU's sources).
type qcow2Header struct {
	size          uint64
	backingFile   string
	backingFormat string
	dataFile      bool
	dataFileName  string
	encrypted     bool
	corrupt       bool
}

// The header fields and extensions read here.
const (
	qcow2IncompatCorrupt  = 1 << 1
	qcow2IncompatDataFile = 1 << 2
	// The incompatible features QEMU 7.2 knows: dirty, corrupt, external
	// data file, compression type, extended L2 entries. An image with
	// another one is refused, as QEMU refuses to open it.
	qcow2IncompatKnown = 1<<5 - 1

	qcow2ExtEnd           = 0
	qcow2ExtBackingFormat = 0xe2792aca
	qcow2ExtCrypto        = 0x0537be77
	qcow2ExtDataFile      = 0x44415441

	// The header and its extensions are in the first cluster, at most
	// 2 MiB; the names are short.
	qcow2MaxClusterBits = 21
	qcow2MaxName        = 1023
)

var errBadQCOW2 = errors.New("not a valid qcow2 header")

// readQCOW2Header reads the header of the qcow2 image at path.
func readQCOW2Header(path string) (qcow2Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return qcow2Header{}, fmt.Errorf("read image %s: %w", path, err)
	}
	defer f.Close()
	h, err := parseQCOW2Header(f)
	if err != nil {
		// The image's own fault: its owner gets the reason.
		return qcow2Header{}, &Error{Status: 400, Kind: ErrImageRefused, Msg: "image refused: " + err.Error()}
	}
	return h, nil
}

func parseQCOW2Header(r io.ReaderAt) (qcow2Header, error) {
	var h qcow2Header
	fixed := make([]byte, 104)
	n, err := r.ReadAt(fixed, 0)
	if n < 72 {
		return h, fmt.Errorf("%w: %d bytes (%v)", errBadQCOW2, n, err)
	}
	be := binary.BigEndian
	if !bytes.Equal(fixed[:4], qcow2Magic) {
		return h, fmt.Errorf("%w: no qcow2 magic", errBadQCOW2)
	}
	version := be.Uint32(fixed[4:])
	clusterBits := be.Uint32(fixed[20:])
	if version != 2 && version != 3 {
		return h, fmt.Errorf("%w: version %d", errBadQCOW2, version)
	}
	if clusterBits < 9 || clusterBits > qcow2MaxClusterBits {
		return h, fmt.Errorf("%w: cluster bits %d", errBadQCOW2, clusterBits)
	}
	cluster := int64(1) << clusterBits
	h.size = be.Uint64(fixed[24:])
	h.encrypted = be.Uint32(fixed[32:]) != 0
	headerLen := int64(72)
	if version == 3 {
		if n < 104 {
			return h, fmt.Errorf("%w: version 3 header of %d bytes", errBadQCOW2, n)
		}
		incompat := be.Uint64(fixed[72:])
		if unknown := incompat &^ qcow2IncompatKnown; unknown != 0 {
			return h, fmt.Errorf("%w: unknown incompatible features %#x", errBadQCOW2, unknown)
		}
		h.corrupt = incompat&qcow2IncompatCorrupt != 0
		h.dataFile = incompat&qcow2IncompatDataFile != 0
		headerLen = int64(be.Uint32(fixed[100:]))
		if headerLen < 104 || headerLen%8 != 0 || headerLen >= cluster {
			return h, fmt.Errorf("%w: header length %d", errBadQCOW2, headerLen)
		}
	}

	if off, size := be.Uint64(fixed[8:]), be.Uint32(fixed[16:]); off != 0 || size != 0 {
		// Whatever its offset and size, the image asks for a backing file.
		name, err := readName(r, int64(off), int64(size), cluster)
		if err != nil {
			return h, fmt.Errorf("%w: backing file name: %v", errBadQCOW2, err)
		}
		h.backingFile = name
		if h.backingFile == "" {
			h.backingFile = "?"
		}
	}

	// Header extensions: type, length, data padded to 8 bytes, up to an
	// end marker, all within the first cluster.
	for off := headerLen; ; {
		if off+8 > cluster {
			return h, fmt.Errorf("%w: header extensions run past the first cluster", errBadQCOW2)
		}
		ext := make([]byte, 8)
		if _, err := r.ReadAt(ext, off); err != nil {
			return h, fmt.Errorf("%w: header extension at %d: %v", errBadQCOW2, off, err)
		}
		typ, length := be.Uint32(ext), int64(be.Uint32(ext[4:]))
		if typ == qcow2ExtEnd {
			break
		}
		data := off + 8
		if length > cluster-data {
			return h, fmt.Errorf("%w: header extension %#x of %d bytes", errBadQCOW2, typ, length)
		}
		switch typ {
		case qcow2ExtBackingFormat:
			if h.backingFormat, err = readName(r, data, length, cluster); err != nil {
				return h, fmt.Errorf("%w: backing format: %v", errBadQCOW2, err)
			}
		case qcow2ExtDataFile:
			if h.dataFileName, err = readName(r, data, length, cluster); err != nil {
				return h, fmt.Errorf("%w: data file name: %v", errBadQCOW2, err)
			}
			// QEMU honours the name only with the feature bit, but a
			// header that carries one is not a standalone image either.
			h.dataFile = true
		case qcow2ExtCrypto:
			h.encrypted = true
		}
		off = data + (length+7)/8*8
	}
	return h, nil
}

// readName reads a name of size bytes at off, which must lie in the first
// cluster.
func readName(r io.ReaderAt, off, size, cluster int64) (string, error) {
	if size > qcow2MaxName || off < 0 || off+size > cluster {
		return "", fmt.Errorf("%d bytes at %d", size, off)
	}
	buf := make([]byte, size)
	if _, err := r.ReadAt(buf, off); err != nil {
		return "", err
	}
	return string(buf), nil
}
