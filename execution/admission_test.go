package execution

import (
	"errors"
	"testing"
)

func TestAdmission(t *testing.T) {
	a := NewAdmission(Capacity{MemoryMiB: 1024, VCPUs: 4})
	prog, err := a.Admit("program a", Capacity{MemoryMiB: 512, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	inst, err := a.Admit("instance b", Capacity{MemoryMiB: 512, VCPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admit("program c", Capacity{MemoryMiB: 128, VCPUs: 1}); !errors.Is(err, ErrInsufficientCapacity) {
		t.Fatalf("past the memory: %v", err)
	}
	prog()
	prog() // a release counts once
	if got := a.Used(); got != (Capacity{MemoryMiB: 512, VCPUs: 2}) {
		t.Fatalf("used %+v after one release", got)
	}
	if _, err := a.Admit("program d", Capacity{MemoryMiB: 128, VCPUs: 3}); !errors.Is(err, ErrInsufficientCapacity) {
		t.Fatalf("past the vCPUs: %v", err)
	}
	// A VM found running is held even past the capacity.
	found := a.Hold(Capacity{MemoryMiB: 1024, VCPUs: 4})
	if got := a.Used(); got != (Capacity{MemoryMiB: 1536, VCPUs: 6}) {
		t.Fatalf("used %+v", got)
	}
	found()
	inst()
	if got := a.Used(); got != (Capacity{}) {
		t.Fatalf("used %+v after every release", got)
	}
	unlimited := NewAdmission(Capacity{})
	if _, err := unlimited.Admit("any", Capacity{MemoryMiB: 1 << 20, VCPUs: 1 << 10}); err != nil {
		t.Fatal(err)
	}
}
