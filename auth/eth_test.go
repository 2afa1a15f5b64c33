package auth

import (
	"testing"

	"github.com/decred/dcrd/dcrec/secp256k1/v4"
)

func TestSignPersonal(t *testing.T) {
	key, err := secp256k1.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("ETH\n0xabc\nPOST\nitem")
	sig := SignPersonal(key, msg)
	got, err := RecoverPersonalSign(msg, sig)
	if err != nil || got != AddressOf(key.PubKey()) || (sig[64] != 27 && sig[64] != 28) {
		t.Errorf("recovered %s %v (v %d), want %s", got, err, sig[64], AddressOf(key.PubKey()))
	}
}
