package execution

import (
	"log/slog"
	"time"
)

// Timing records how long each phase of a VM's start took, for the start's
// log line and for benchmarks.
type Timing struct {
	start  time.Time
	last   time.Time
	Phases []Phase
}

// Phase is one step of a start and its duration.
type Phase struct {
	Name string
	Took time.Duration
}

// StartTiming begins timing a start.
func StartTiming() *Timing {
	now := time.Now()
	return &Timing{start: now, last: now}
}

// Done records that phase name has ended.
func (t *Timing) Done(name string) {
	now := time.Now()
	t.Phases = append(t.Phases, Phase{Name: name, Took: now.Sub(t.last)})
	t.last = now
}

// Total is the time since the start began.
func (t *Timing) Total() time.Duration { return time.Since(t.start) }

// LogValue shows each phase, in milliseconds, and the total.
func (t *Timing) LogValue() slog.Value {
	attrs := make([]slog.Attr, 0, len(t.Phases)+1)
	for _, p := range t.Phases {
		attrs = append(attrs, slog.Duration(p.Name, p.Took.Round(time.Millisecond)))
	}
	attrs = append(attrs, slog.Duration("total", t.Total().Round(time.Millisecond)))
	return slog.GroupValue(attrs...)
}
