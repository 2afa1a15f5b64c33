package api

import (
	"context"
	"encoding/json"
	"net/http"
	"time"
)

// ExecutionRecords gives the rows of /about/executions/records.
type ExecutionRecords interface {
	ExecutionRecords(ctx context.Context) ([]ExecutionRecord, error)
}

// ExecutionRecord is one execution as the reference's executions table
// row (§7 of its notes): the fields this node does not measure (CPU time
// and I/O counters, which the reference fills for ephemeral VMs only) are
// null.
type ExecutionRecord struct {
	UUID            string                `json:"uuid"`
	VMHash          string                `json:"vm_hash"`
	VMID            *int                  `json:"vm_id"`
	TimeDefined     string                `json:"time_defined"`
	TimePrepared    *string               `json:"time_prepared"`
	TimeStarted     *string               `json:"time_started"`
	TimeStopping    *string               `json:"time_stopping"`
	CPUTimeUser     *float64              `json:"cpu_time_user"`
	CPUTimeSystem   *float64              `json:"cpu_time_system"`
	IOReadCount     *int64                `json:"io_read_count"`
	IOWriteCount    *int64                `json:"io_write_count"`
	IOReadBytes     *int64                `json:"io_read_bytes"`
	IOWriteBytes    *int64                `json:"io_write_bytes"`
	VCPUs           int                   `json:"vcpus"`
	Memory          int                   `json:"memory"`
	NetworkTap      *string               `json:"network_tap"`
	Message         json.RawMessage       `json:"message"`
	OriginalMessage json.RawMessage       `json:"original_message"`
	Persistent      bool                  `json:"persistent"`
	GPUs            []any                 `json:"gpus"`
	MappedPorts     map[string]MappedPort `json:"mapped_ports"`
}

// RecordTime is a time as the reference's rows print it (str(datetime)).
func RecordTime(t time.Time) *string {
	if t.IsZero() {
		return nil
	}
	s := t.UTC().Format("2006-01-02 15:04:05.000000+00:00")
	return &s
}

func (s *Server) handleExecutionRecords(w http.ResponseWriter, r *http.Request) {
	if s.opts.Records == nil {
		writeJSON(w, http.StatusOK, []ExecutionRecord{})
		return
	}
	recs, err := s.opts.Records.ExecutionRecords(r.Context())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	if recs == nil {
		recs = []ExecutionRecord{}
	}
	writeJSON(w, http.StatusOK, recs)
}
