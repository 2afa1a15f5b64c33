package baseimage

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckTools(t *testing.T) {
	found := func(string) (string, error) { return "/usr/bin/x", nil }
	if err := checkTools(found); err != nil {
		t.Error(err)
	}
	none := func(string) (string, error) { return "", errors.New("not found") }
	err := checkTools(none)
	if err == nil || !strings.Contains(err.Error(), "apt-get install e2fsprogs mmdebstrap") {
		t.Errorf("%v", err)
	}
}
