package guest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// The config drive is a raw block device image: a 512-byte header, then
// the Config as JSON from byte 512, zero-padded to a multiple of 4096
// bytes. The header holds, in order: the 16-byte magic, the format version
// (uint32, big endian), 4 reserved bytes, the JSON's length (uint64) and
// its SHA-256. The host writes it without root or mount; the init reads it
// from /dev/vda.
var configMagic = [16]byte{'A', 'L', 'E', 'P', 'H', 'V', 'M', '-', 'C', 'O', 'N', 'F', 'I', 'G', '\n', 0}

const (
	configHeaderSize = 512
	configAlign      = 4096
	configFormat     = 1
	maxConfigSize    = 16 << 20
)

// WriteConfigDrive validates cfg and writes it as a config drive image at
// path, atomically (a temporary file renamed into place).
func WriteConfigDrive(path string, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("config drive %s: invalid config: %w", path, err)
	}
	img, err := EncodeConfigDrive(cfg)
	if err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".config-drive-*")
	if err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(img); err != nil {
		tmp.Close()
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("config drive %s: %w", path, err)
	}
	return nil
}

// EncodeConfigDrive returns the config drive image of cfg, without
// validating it.
func EncodeConfigDrive(cfg Config) ([]byte, error) {
	payload, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if len(payload) > maxConfigSize {
		return nil, fmt.Errorf("config is %d bytes, more than %d", len(payload), maxConfigSize)
	}
	size := (configHeaderSize + len(payload) + configAlign - 1) / configAlign * configAlign
	img := make([]byte, size)
	copy(img, configMagic[:])
	binary.BigEndian.PutUint32(img[16:], configFormat)
	binary.BigEndian.PutUint64(img[24:], uint64(len(payload)))
	sum := sha256.Sum256(payload)
	copy(img[32:], sum[:])
	copy(img[configHeaderSize:], payload)
	return img, nil
}

// ErrNotConfigDrive is returned by ReadConfigDrive for a device that does
// not start with the config drive's magic.
var ErrNotConfigDrive = errors.New("not an alephvm config drive")

// ReadConfigDrive reads and checks the config drive image in r.
func ReadConfigDrive(r io.ReaderAt) (Config, error) {
	var cfg Config
	header := make([]byte, configHeaderSize)
	if _, err := r.ReadAt(header, 0); err != nil {
		return cfg, fmt.Errorf("read config drive header: %w", err)
	}
	if !bytes.Equal(header[:16], configMagic[:]) {
		return cfg, ErrNotConfigDrive
	}
	if v := binary.BigEndian.Uint32(header[16:]); v != configFormat {
		return cfg, fmt.Errorf("config drive format %d, this init reads %d", v, configFormat)
	}
	n := binary.BigEndian.Uint64(header[24:])
	if n > maxConfigSize {
		return cfg, fmt.Errorf("config drive claims %d bytes of config, more than %d", n, maxConfigSize)
	}
	payload := make([]byte, n)
	if _, err := r.ReadAt(payload, configHeaderSize); err != nil {
		return cfg, fmt.Errorf("read config drive: %w", err)
	}
	if sum := sha256.Sum256(payload); !bytes.Equal(sum[:], header[32:64]) {
		return cfg, errors.New("config drive checksum mismatch")
	}
	if err := json.Unmarshal(payload, &cfg); err != nil {
		return cfg, fmt.Errorf("decode config drive: %w", err)
	}
	if cfg.Version != ConfigVersion {
		return cfg, fmt.Errorf("config version %d, this init reads %d", cfg.Version, ConfigVersion)
	}
	return cfg, nil
}

// SectorSize is the unit of a drive's size.
const SectorSize = 512

// PayloadDrive makes dst a drive image for a zip or file drive: the bytes
// of src, zero-padded to a whole number of sectors (Firecracker does not
// show a partial last sector to the guest). It returns the payload's
// size, for Drive.Size. When src needs no padding, dst is a hard link to
// it if they are on one filesystem.
func PayloadDrive(src, dst string) (int64, error) {
	st, err := os.Stat(src)
	if err != nil {
		return 0, fmt.Errorf("payload drive: %w", err)
	}
	size := st.Size()
	if size == 0 {
		return 0, fmt.Errorf("payload drive: %s is empty", src)
	}
	if size%SectorSize == 0 && os.Link(src, dst) == nil {
		return size, nil
	}
	in, err := os.Open(src)
	if err != nil {
		return 0, fmt.Errorf("payload drive: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return 0, fmt.Errorf("payload drive: %w", err)
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Truncate((size + SectorSize - 1) / SectorSize * SectorSize)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return 0, fmt.Errorf("payload drive %s: %w", dst, err)
	}
	return size, nil
}
