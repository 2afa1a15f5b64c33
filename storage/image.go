package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"unicode/utf8"
)

// The image formats the node opens. Every image is opened with its format
// named (qemu-img -f/-F, QEMU's driver), never probed from its content:
// a raw disk a guest wrote a qcow2 header into stays a raw disk.
const (
	FormatRaw   = "raw"
	FormatQCOW2 = "qcow2"
)

// Image is an image file as the node opens it: where it is and the format
// the node decided it has.
type Image struct {
	Path   string
	Format string
}

// ImageInfo is what an image is, and what it asks for beyond its own
// bytes, as its header says. Reading it opens nothing the image names.
// Whether what it asks for is granted is the caller's policy (Standalone
// for base images); a chain of images is then built by the node from
// images it chose, and given to QEMU whole (hypervisor.Drive.Backing), so
// a name written in a header is never followed.
type ImageInfo struct {
	Image
	VirtualSize int64
	// BackingFile and BackingFormat are the backing file a qcow2 names:
	// a path, a protocol URL or a json: description, as written.
	BackingFile   string
	BackingFormat string
	// DataFile is set when a qcow2 keeps its data in an external file;
	// DataFileName is that file's name when the header gives one.
	DataFile     bool
	DataFileName string
	Encrypted    bool
	Corrupt      bool
}

// ErrImageRefused is what an image the node will not use is, with its
// reason (errors.Is).
var ErrImageRefused = errors.New("image refused")

// Standalone accepts an image that is its own whole content: raw, or a
// qcow2 with no backing file, no external data file and no encryption,
// and not marked corrupt. A refusal says why and is a 400 for a client.
func (i ImageInfo) Standalone() error {
	why := ""
	switch {
	case i.BackingFile != "":
		why = fmt.Sprintf("it names a backing file (%s)", quote(i.BackingFile))
	case i.DataFile:
		why = fmt.Sprintf("it keeps its data in an external data file (%s)", quote(i.DataFileName))
	case i.Encrypted:
		why = "it is encrypted"
	case i.Corrupt:
		why = "it is marked corrupt"
	case i.Format != FormatRaw && i.Format != FormatQCOW2:
		why = fmt.Sprintf("it is a %s image", i.Format)
	default:
		return nil
	}
	return &Error{Status: 400, Kind: ErrImageRefused,
		Msg: "image refused: " + why + "; an image must be raw, or a qcow2 with no backing file, data file or encryption of its own"}
}

// quote shows a name taken from an image, bounded and printable.
func quote(s string) string {
	const max = 120
	if len(s) > max {
		s = s[:max]
		for !utf8.ValidString(s) && len(s) > 0 {
			s = s[:len(s)-1]
		}
		return fmt.Sprintf("%q...", s)
	}
	return fmt.Sprintf("%q", s)
}

// InspectParent decides the format of path, a base image of the node's
// store, reads what it asks for, and refuses it unless it stands alone
// (Standalone). It is how an image enters the node: the Image it returns
// is then opened with that format everywhere.
func InspectParent(ctx context.Context, path string) (ImageInfo, error) {
	format, err := DetectFormat(path)
	if err != nil {
		return ImageInfo{}, err
	}
	info, err := Inspect(ctx, Image{Path: path, Format: format})
	if err != nil {
		return ImageInfo{}, err
	}
	return info, info.Standalone()
}

// Inspect reads an image opened as img.Format: its virtual size and what
// it asks for. A qcow2's header is read here first, and an image that
// names another file is answered from it alone; qemu-img, told the
// format, reads the others and must agree.
func Inspect(ctx context.Context, img Image) (ImageInfo, error) {
	info := ImageInfo{Image: img}
	switch img.Format {
	case FormatRaw:
	case FormatQCOW2:
		h, err := readQCOW2Header(img.Path)
		if err != nil {
			return ImageInfo{}, err
		}
		info.VirtualSize = int64(h.size)
		info.BackingFile, info.BackingFormat = h.backingFile, h.backingFormat
		info.DataFile, info.DataFileName = h.dataFile, h.dataFileName
		info.Encrypted, info.Corrupt = h.encrypted, h.corrupt
		if info.Standalone() != nil {
			return info, nil
		}
	default:
		return ImageInfo{}, fmt.Errorf("inspect image %s: format %q: the node opens raw and qcow2 images only", img.Path, img.Format)
	}
	out, err := run(ctx, "qemu-img", "info", "--output=json", "-U", "-f", img.Format, img.Path)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("inspect image %s: %w", img.Path, err)
	}
	var q qemuImgInfo
	if err := json.Unmarshal(out, &q); err != nil {
		return ImageInfo{}, fmt.Errorf("inspect image %s: %w", img.Path, err)
	}
	if q.Format != img.Format {
		return ImageInfo{}, fmt.Errorf("inspect image %s: qemu-img read it as %q, not %s", img.Path, q.Format, img.Format)
	}
	info.VirtualSize = q.VirtualSize
	if info.BackingFile == "" {
		info.BackingFile, info.BackingFormat = q.BackingFilename, q.BackingFormat
	}
	d := q.FormatSpecific.Data
	if d.DataFile != "" && !info.DataFile {
		info.DataFile, info.DataFileName = true, d.DataFile
	}
	info.Encrypted = info.Encrypted || q.Encrypted || d.Encrypt != nil
	info.Corrupt = info.Corrupt || d.Corrupt
	return info, nil
}

// qemuImgInfo is what `qemu-img info --output=json` says of an image.
type qemuImgInfo struct {
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	BackingFilename string `json:"backing-filename"`
	BackingFormat   string `json:"backing-filename-format"`
	Encrypted       bool   `json:"encrypted"`
	FormatSpecific  struct {
		Data struct {
			DataFile string          `json:"data-file"`
			Encrypt  json.RawMessage `json:"encrypt"`
			Corrupt  bool            `json:"corrupt"`
		} `json:"data"`
	} `json:"format-specific"`
}

// qcow2Magic starts every qcow (version 1) and qcow2 image.
var qcow2Magic = []byte("QFI\xfb")

// otherFormats are the starts of the other image formats QEMU would probe
// (block/*.c probe functions): refused by name rather than used as raw
// bytes no guest could boot. Several of them name other files (a vmdk
// descriptor its extents), which is why the node never lets QEMU probe.
var otherFormats = []struct {
	offset int
	magic  string
	name   string
}{
	{0, "QED\x00", "qed"},
	{0, "KDMV", "vmdk"},
	{0, "COWD", "vmdk"},
	{0, "# Disk DescriptorFile", "vmdk"},
	{0, "vhdxfile", "vhdx"},
	{0, "conectix", "vpc (VHD)"},
	{0, "LUKS\xba\xbe", "luks (encrypted)"},
	{0, "WithoutFreeSpace", "parallels"},
	{0, "WithouFreSpacExt", "parallels"},
	{0, "Bochs Virtual HD Image", "bochs"},
	{0, "#!/bin/sh\n#V2.0 Format", "cloop"},
	{64, "\x7f\x10\xda\xbe", "vdi"},
}

// DetectFormat decides the format of a base image from its first bytes:
// qcow2 when it has qcow2's magic, raw otherwise; the other formats QEMU
// knows, and qcow version 1, are refused (ErrImageRefused). It runs once,
// on an image from the store; disks the guest writes are never detected
// again, their format is the one they were made with.
func DetectFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read image %s: %w", path, err)
	}
	defer f.Close()
	head := make([]byte, 128)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read image %s: %w", path, err)
	}
	head = head[:n]
	if bytes.HasPrefix(head, qcow2Magic) {
		if len(head) >= 8 && binary.BigEndian.Uint32(head[4:]) == 1 {
			return "", refusedFormat("qcow (version 1)")
		}
		return FormatQCOW2, nil
	}
	for _, o := range otherFormats {
		if len(head) >= o.offset+len(o.magic) && string(head[o.offset:o.offset+len(o.magic)]) == o.magic {
			return "", refusedFormat(o.name)
		}
	}
	return FormatRaw, nil
}

func refusedFormat(name string) error {
	return &Error{Status: 400, Kind: ErrImageRefused,
		Msg: fmt.Sprintf("image refused: it is a %s image; an image must be raw, or a qcow2 with no backing file, data file or encryption of its own", name)}
}
