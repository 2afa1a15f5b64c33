package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/coder/websocket"

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

// sign adds the caller's credentials to a request of the node's API.
func (c nodeClient) sign(req *http.Request) error {
	if c.signer == nil {
		if c.token != "" {
			req.Header.Set("X-Auth-Signature", c.token)
		}
		return nil
	}
	h, err := c.signer.Headers(req.Method, req.URL.Path)
	if err != nil {
		return err
	}
	for k, v := range h {
		req.Header[k] = v
	}
	return nil
}

// dialLogs opens a websocket on a VM's output: an owner's on stream_logs,
// whose first frame carries the signed credentials; the operator's on
// logs, with the token in the upgrade's headers.
func (c nodeClient) dialLogs(ctx context.Context, ref string) (*websocket.Conn, error) {
	ws := "ws" + strings.TrimPrefix(c.base, "http")
	if c.signer == nil {
		h := http.Header{}
		if c.token != "" {
			h.Set("X-Auth-Signature", c.token)
		}
		conn, _, err := websocket.Dial(ctx, ws+"/control/machine/"+ref+"/logs", &websocket.DialOptions{HTTPHeader: h})
		return conn, err
	}
	path := "/control/machine/" + ref + "/stream_logs"
	conn, _, err := websocket.Dial(ctx, ws+path, nil)
	if err != nil {
		return nil, err
	}
	frame, err := c.signer.AuthFrame(path)
	if err == nil {
		err = conn.Write(ctx, websocket.MessageText, frame)
	}
	if err != nil {
		conn.CloseNow()
		return nil, err
	}
	return conn, nil
}
