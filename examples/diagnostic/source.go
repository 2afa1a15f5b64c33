// Package diagnostic holds the node's diagnostic program, so that the node
// can store and run it on a fresh machine (package diagnostic at the
// module's root deploys and checks it).
package diagnostic

import _ "embed"

// Source is the program: an ASGI app, main:app.
//
//go:embed main.py
var Source []byte
