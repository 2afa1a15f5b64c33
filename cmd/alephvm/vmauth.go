package main

import (
	"fmt"
	"net/url"
	"os"

	"github.com/alephvm/alephvm/auth"
)

// vmCredentials are who `alephvm vm` calls the node as: a VM owner's
// wallet (--key), signing as the Aleph SDKs do, or the operator's
// allocation token.
type vmCredentials struct {
	keyFile string // --key: a file holding an Ethereum private key in hex
	node    string // --node: the node's URL
}

// walletSigner reads the --key file and signs for the node at base.
func walletSigner(keyFile, base string) (*auth.OwnerSigner, error) {
	raw, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("--key: %w", err)
	}
	key, err := auth.ParseWalletKey(string(raw))
	if err != nil {
		return nil, fmt.Errorf("--key %s: %w", keyFile, err)
	}
	u, err := url.Parse(base)
	if err != nil || u.Hostname() == "" {
		return nil, fmt.Errorf("node URL %q: want http(s)://host[:port]", base)
	}
	// The SDKs sign for the host name of the node's URL, which must be the
	// node's DOMAIN_NAME.
	return auth.NewOwnerSigner(key, u.Hostname(), nil), nil
}
