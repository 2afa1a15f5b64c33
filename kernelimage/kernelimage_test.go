package kernelimage

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"strings"
	"testing"
)

// lz4Literals encodes data as one LZ4 block made of a single literal run,
// which is valid LZ4 that any decoder must read.
func lz4Literals(data []byte) []byte {
	n := len(data)
	var b []byte
	if n < 15 {
		b = append(b, byte(n<<4))
	} else {
		b = append(b, 0xf0)
		rest := n - 15
		for ; rest >= 255; rest -= 255 {
			b = append(b, 255)
		}
		b = append(b, byte(rest))
	}
	return append(b, data...)
}

func TestDecodeLZ4Block(t *testing.T) {
	long := bytes.Repeat([]byte("0123456789"), 100)
	if got, err := decodeLZ4Block(lz4Literals(long), nil, 1<<20); err != nil || !bytes.Equal(got, long) {
		t.Errorf("literals: %v", err)
	}
	// "abc" then a match of 9 at offset 3 (overlapping its own output),
	// then the last literals "!".
	block := []byte{0x35, 'a', 'b', 'c', 3, 0, 0x10, '!'}
	if got, err := decodeLZ4Block(block, nil, 100); err != nil || string(got) != "abcabcabcabc!" {
		t.Errorf("overlapping match: %q %v", got, err)
	}
	for name, bad := range map[string][]byte{
		"offset past start": {0x10, 'a', 9, 0, 0x00},
		"truncated":         {0x50, 'a'},
		"zero offset":       {0x10, 'a', 0, 0, 0x00},
	} {
		if _, err := decodeLZ4Block(bad, nil, 100); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := decodeLZ4Block(block, nil, 5); err == nil {
		t.Error("block over its limit accepted")
	}
}

// fakeBzImage builds a bzImage-shaped file whose payload is compressed
// kernel (an "ELF" here) as Linux's build does.
func fakeBzImage(payload []byte) []byte {
	const setupSects = 3
	img := make([]byte, (setupSects+1)*512)
	img[setupSectsOffset] = setupSects
	copy(img[headerMagicOffset:], "HdrS")
	binary.LittleEndian.PutUint16(img[bootVersionOffset:], 0x20f)
	// The payload sits 100 bytes into the protected-mode code.
	binary.LittleEndian.PutUint32(img[payloadOffsetOffset:], 100)
	binary.LittleEndian.PutUint32(img[payloadLengthOffset:], uint32(len(payload)))
	img = append(img, make([]byte, 100)...)
	img = append(img, payload...)
	return append(img, make([]byte, 64)...)
}

func TestExtractVmlinux(t *testing.T) {
	elf := append([]byte("\x7fELF"), bytes.Repeat([]byte("kernel"), 3000)...)

	// LZ4 legacy: two blocks, then the uncompressed size the build appends.
	var lz4 bytes.Buffer
	lz4.Write(lz4LegacyMagic)
	for _, part := range [][]byte{elf[:7000], elf[7000:]} {
		block := lz4Literals(part)
		binary.Write(&lz4, binary.LittleEndian, uint32(len(block)))
		lz4.Write(block)
	}
	binary.Write(&lz4, binary.LittleEndian, uint32(len(elf)))

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(elf)
	zw.Close()

	for name, payload := range map[string][]byte{"lz4": lz4.Bytes(), "gzip": gz.Bytes()} {
		got, err := ExtractVmlinux(fakeBzImage(payload))
		if err != nil || !bytes.Equal(got, elf) {
			t.Errorf("%s: %d bytes, %v", name, len(got), err)
		}
	}
	if _, err := ExtractVmlinux(fakeBzImage([]byte{0xfd, '7', 'z', 'X', 'Z', 0})); err == nil || !strings.Contains(err.Error(), "unsupported") {
		t.Errorf("xz: %v", err)
	}
	if _, err := ExtractVmlinux(make([]byte, 4096)); err == nil || !strings.Contains(err.Error(), "HdrS") {
		t.Errorf("not a kernel: %v", err)
	}
}
