package auth

import (
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"strconv"
	"strings"

	"github.com/decred/dcrd/dcrec/secp256k1/v4"
	"github.com/decred/dcrd/dcrec/secp256k1/v4/ecdsa"
	"golang.org/x/crypto/sha3"
)

// Address is an Ethereum address in lower case hex with its 0x prefix.
type Address string

func keccak256(data ...[]byte) []byte {
	h := sha3.NewLegacyKeccak256()
	for _, d := range data {
		h.Write(d)
	}
	return h.Sum(nil)
}

// PersonalSignHash is the EIP-191 (personal_sign) digest of msg.
func PersonalSignHash(msg []byte) []byte {
	return keccak256([]byte("\x19Ethereum Signed Message:\n"+strconv.Itoa(len(msg))), msg)
}

// AddressOf returns the Ethereum address of a public key.
func AddressOf(pub *secp256k1.PublicKey) Address {
	uncompressed := pub.SerializeUncompressed()
	return Address("0x" + hex.EncodeToString(keccak256(uncompressed[1:])[12:]))
}

// halfOrder is n/2: a signature with s above it has a twin with n-s, so
// only the low-s form is accepted (EIP-2).
var halfOrder = new(big.Int).Rsh(secp256k1.S256().N, 1)

// RecoverPersonalSign returns the address that signed msg with
// personal_sign, given the 65-byte signature r || s || v (v is 27/28 or
// 0/1).
func RecoverPersonalSign(msg, sig []byte) (Address, error) {
	return recoverPersonalSign(msg, sig, true)
}

// recoverPersonalSign recovers a personal_sign signer; with lowSOnly false
// a high-s signature is turned into its low-s twin, which has the other
// recovery id.
func recoverPersonalSign(msg, sig []byte, lowSOnly bool) (Address, error) {
	if len(sig) != 65 {
		return "", fmt.Errorf("signature has %d bytes, want 65", len(sig))
	}
	v := sig[64]
	if v >= 27 {
		v -= 27
	}
	if v > 1 {
		return "", fmt.Errorf("signature recovery id %d is not 0 or 1", sig[64])
	}
	compact := make([]byte, 65)
	copy(compact[1:], sig[:64])
	if s := new(big.Int).SetBytes(sig[32:64]); s.Cmp(halfOrder) > 0 {
		if lowSOnly {
			return "", errors.New("signature is not in low-s form")
		}
		new(big.Int).Sub(secp256k1.S256().N, s).FillBytes(compact[33:65])
		v ^= 1
	}
	compact[0] = 27 + v
	pub, _, err := ecdsa.RecoverCompact(compact, PersonalSignHash(msg))
	if err != nil {
		return "", fmt.Errorf("recover signer: %w", err)
	}
	return AddressOf(pub), nil
}

// ParseAddress checks an Ethereum address: 0x and 40 hex digits, in one
// case or with a valid EIP-55 checksum.
func ParseAddress(s string) (Address, error) {
	hexPart, ok := strings.CutPrefix(s, "0x")
	if !ok || len(hexPart) != 40 {
		return "", fmt.Errorf("address %q: want 0x and 40 hex digits", s)
	}
	if _, err := hex.DecodeString(hexPart); err != nil {
		return "", fmt.Errorf("address %q: %w", s, err)
	}
	lower := strings.ToLower(hexPart)
	if hexPart != lower && hexPart != strings.ToUpper(hexPart) && checksum(lower) != hexPart {
		return "", fmt.Errorf("address %q: bad EIP-55 checksum", s)
	}
	return Address("0x" + lower), nil
}

// checksum applies EIP-55 mixed case to a lower-case hex address.
func checksum(lower string) string {
	h := hex.EncodeToString(keccak256([]byte(lower)))
	out := []byte(lower)
	for i, c := range out {
		if c >= 'a' && h[i] >= '8' {
			out[i] = c - 'a' + 'A'
		}
	}
	return string(out)
}

// SignPersonal signs msg with personal_sign, as an Ethereum wallet does:
// the 65-byte signature r || s || v, v 27 or 28, s low.
func SignPersonal(key *secp256k1.PrivateKey, msg []byte) []byte {
	compact := ecdsa.SignCompact(key, PersonalSignHash(msg), false)
	sig := make([]byte, 65)
	copy(sig, compact[1:])
	sig[64] = compact[0]
	return sig
}
