package message

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
)

// ItemType says where a message's content is kept.
type ItemType string

// The item types of aleph-message 1.1.1.
const (
	ItemInline  ItemType = "inline"
	ItemStorage ItemType = "storage"
	ItemIPFS    ItemType = "ipfs"
)

// ItemHash names an item: a sha256 hex digest for storage and inline items,
// an IPFS CID (v0 or v1) for IPFS items.
type ItemHash string

const (
	hexLower   = "0123456789abcdef"
	base58btc  = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
	base32Low  = "abcdefghijklmnopqrstuvwxyz234567"
	sha256Size = 64
)

func onlyFrom(s, alphabet string) bool {
	for _, r := range s {
		if !strings.ContainsRune(alphabet, r) {
			return false
		}
	}
	return true
}

// ParseItemHash checks a hash's format exactly as aleph-message 1.1.1's
// ItemType.from_hash does.
func ParseItemHash(s string) (ItemHash, error) {
	if _, err := ItemTypeOf(s); err != nil {
		return "", err
	}
	return ItemHash(s), nil
}

// ItemTypeOf returns the storage kind a hash's format implies: ipfs for a
// CIDv0 or CIDv1, storage for a lowercase sha256 hex digest.
func ItemTypeOf(s string) (ItemType, error) {
	switch {
	case strings.HasPrefix(s, "Qm") && len(s) >= 44 && len(s) <= 46 && onlyFrom(s[2:], base58btc):
		return ItemIPFS, nil
	case strings.HasPrefix(s, "bafy") && len(s) == 59 && onlyFrom(s[4:], base32Low):
		return ItemIPFS, nil
	case len(s) == sha256Size && onlyFrom(s, hexLower):
		return ItemStorage, nil
	}
	return "", fmt.Errorf("could not determine hash type: %q", truncate(s, 80))
}

// Type returns the storage kind the hash's format implies.
func (h ItemHash) Type() ItemType {
	t, _ := ItemTypeOf(string(h))
	return t
}

// IsSHA256 reports whether the hash is a sha256 hex digest.
func (h ItemHash) IsSHA256() bool { return h.Type() == ItemStorage }

// SHA256Hex returns the lowercase hex sha256 of data, the item hash of an
// inline message's item_content or of a stored file.
func SHA256Hex(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}
