package execution

import (
	"log/slog"
	"time"

	"github.com/alephvm/alephvm/message"
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

// The types of VM the node's metrics and status page tell apart.
const (
	TypeProgram           = "program"
	TypePersistentProgram = "persistent_program"
	TypeInstance          = "instance"
)

// ColdStart is one VM start, ended well or not, as the node's metrics and
// status page show it.
type ColdStart struct {
	Ref  message.ItemHash
	Type string // TypeProgram, TypePersistentProgram or TypeInstance
	At   time.Time
	// Phases are those the start went through, the failed one last.
	Phases []Phase
	Total  time.Duration
	// Err is why the start failed; nil when the VM started.
	Err error
}

// StartObserver is told of each VM start once it has ended.
type StartObserver interface {
	ColdStart(ColdStart)
}

// Report tells o (when not nil) of the start t timed, which ended with
// err; the phase under way when it failed is recorded as failed.
func (t *Timing) Report(o StartObserver, ref message.ItemHash, typ string, err error) {
	if o == nil {
		return
	}
	phases := append([]Phase(nil), t.Phases...)
	if err != nil && time.Since(t.last) > 0 {
		phases = append(phases, Phase{Name: "failed", Took: time.Since(t.last)})
	}
	o.ColdStart(ColdStart{Ref: ref, Type: typ, At: t.start, Phases: phases, Total: t.Total(), Err: err})
}
