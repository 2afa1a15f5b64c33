package release

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestReleaseInReverseOnce(t *testing.T) {
	var l List
	var order []string
	for _, what := range []string{"tap", "directory", "disk", "vm"} {
		l.AddFunc(what, func() { order = append(order, what) })
	}
	l.Add("record", func(context.Context) error { order = append(order, "record"); return errors.New("database closed") })
	if l.Len() != 5 {
		t.Fatalf("%d steps", l.Len())
	}
	err := l.Release(context.Background())
	if got := strings.Join(order, ","); got != "record,vm,disk,directory,tap" {
		t.Errorf("released %s", got)
	}
	if err == nil || !strings.Contains(err.Error(), "release record: database closed") {
		t.Errorf("error %v", err)
	}
	if err := l.Release(context.Background()); err != nil || len(order) != 5 {
		t.Errorf("a second release ran again: %v %v", order, err)
	}
	if l.Len() != 0 {
		t.Errorf("%d steps left", l.Len())
	}
}
