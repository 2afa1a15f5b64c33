package storage

import (
	"context"
	"fmt"
	"strings"

	"github.com/alephvm/alephvm/message"
)

// LayerScheme starts the backing file name of a layer: a qcow2 that names
// its parent by the item hash of a STORE message (aleph://<sha256 hex>),
// which the node resolves through its own store. It is not a name QEMU
// can open: the node builds the chain itself (docs/layers.md).
const LayerScheme = "aleph://"

// DefaultLayerMaxDepth is the most layers InspectChain accepts over a
// base image when told none.
const DefaultLayerMaxDepth = 8

// LayerBacking is the backing file name a layer over the item hash gives.
func LayerBacking(hash message.ItemHash) string { return LayerScheme + string(hash) }

// LayerParent is the item hash a layer names as its parent, or false when
// its backing file is not an aleph:// name (or it has none).
func (i ImageInfo) LayerParent() (message.ItemHash, bool) {
	rest, ok := strings.CutPrefix(i.BackingFile, LayerScheme)
	if !ok {
		return "", false
	}
	h := message.ItemHash(rest)
	return h, h.IsSHA256()
}

// Resolver gives the local path of the image the STORE message hash
// names; its errors keep the status a client gets for them.
type Resolver func(ctx context.Context, hash message.ItemHash) (string, error)

// InspectChain reads the image at path and, while it is a layer naming
// its parent by item hash, the parents resolve gives, and returns the
// chain top first, each with the format the node opens it with. A qcow2
// in the chain stands alone or names aleph://<item hash> with its
// parent's format; anything else in a backing field (a path, a protocol,
// json:) is refused, as are a data file, encryption, corruption, a
// parent's format other than the one named, a hash met twice and more
// than maxDepth layers over the base (0: DefaultLayerMaxDepth). Nothing a
// header names is opened: only what resolve gives.
func InspectChain(ctx context.Context, path string, resolve Resolver, maxDepth int) ([]ImageInfo, error) {
	if maxDepth <= 0 {
		maxDepth = DefaultLayerMaxDepth
	}
	format, err := DetectFormat(path)
	if err != nil {
		return nil, err
	}
	seen := map[message.ItemHash]bool{}
	var chain []ImageInfo
	for {
		info, err := Inspect(ctx, Image{Path: path, Format: format})
		if err != nil {
			return nil, err
		}
		chain = append(chain, info)
		if info.BackingFile == "" {
			return chain, info.Standalone()
		}
		hash, err := info.layerParent()
		if err != nil {
			return nil, err
		}
		if seen[hash] {
			return nil, layerRefused("the chain names %s twice: a loop", LayerBacking(hash))
		}
		seen[hash] = true
		if len(chain) > maxDepth {
			return nil, layerRefused("the chain has more than %d layers over its base (LAYER_MAX_DEPTH)", maxDepth)
		}
		path, err = resolve(ctx, hash)
		if err != nil {
			return nil, fmt.Errorf("layer parent %s: %w", LayerBacking(hash), err)
		}
		format, err = DetectFormat(path)
		if err != nil {
			return nil, fmt.Errorf("layer parent %s: %w", LayerBacking(hash), err)
		}
		if format != info.BackingFormat {
			return nil, layerRefused("it names %s as a %s image, and that image is %s", LayerBacking(hash), quote(info.BackingFormat), format)
		}
	}
}

// layerParent checks a qcow2 with a backing file is a layer the node
// builds a chain for: its parent named by item hash, with its format, and
// nothing else asked for.
func (i ImageInfo) layerParent() (message.ItemHash, error) {
	hash, ok := i.LayerParent()
	switch {
	case !ok:
		return "", layerRefused("it names a backing file (%s); a layer names its parent as %s<item hash>", quote(i.BackingFile), LayerScheme)
	case i.BackingFormat != FormatRaw && i.BackingFormat != FormatQCOW2:
		return "", layerRefused("it names %s without its format (raw or qcow2), as %s", LayerBacking(hash), quote(i.BackingFormat))
	}
	alone := i
	alone.BackingFile, alone.BackingFormat = "", ""
	if err := alone.Standalone(); err != nil {
		return "", err
	}
	return hash, nil
}

func layerRefused(format string, args ...any) error {
	return &Error{Status: 400, Kind: ErrImageRefused, Msg: "image refused: " + fmt.Sprintf(format, args...)}
}

// Images are the images of a chain as the node opens them.
func Images(chain []ImageInfo) []Image {
	out := make([]Image, len(chain))
	for i, c := range chain {
		out[i] = c.Image
	}
	return out
}
