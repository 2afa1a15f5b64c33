package execution

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestTimingLogLine(t *testing.T) {
	tm := StartTiming()
	for _, p := range []string{"fetch", "network", "disks", "hypervisor", "control", "ready"} {
		tm.Done(p)
	}
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("program started", "phases", tm)
	line := buf.String()
	for _, want := range []string{"phases.fetch=", "phases.network=", "phases.disks=", "phases.hypervisor=", "phases.control=", "phases.ready=", "phases.total="} {
		if !strings.Contains(line, want) {
			t.Errorf("%q lacks %s", line, want)
		}
	}
	if len(tm.Phases) != 6 {
		t.Errorf("%d phases", len(tm.Phases))
	}
}
