package execution

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/alephvm/alephvm/hypervisor"
	"github.com/alephvm/alephvm/message"
	"github.com/alephvm/alephvm/network"
)

// Kind tells programs from instances.
type Kind string

// The kinds of execution.
const (
	KindProgram  Kind = "program"
	KindInstance Kind = "instance"
)

// State is where an execution is in its life, as recorded.
type State string

// The recorded states.
const (
	StateStarting State = "starting"
	StateRunning  State = "running"
	StateStopped  State = "stopped"
)

// Record is an execution as the database keeps it.
type Record struct {
	Ref         message.ItemHash
	Kind        Kind
	State       State
	Hypervisor  string
	VCPUs       int
	MemoryMiB   int
	NetIndex    int // -1 when the VM has no network
	Tap         string
	IPv4Network string
	IPv4        string
	IPv6Network string
	IPv6        string
	VMDir       string
	Forwards    []network.Forward
	CreatedAt   time.Time
	StartedAt   time.Time
	StoppedAt   time.Time
}

// HypervisorName is the backend the execution runs under: records made
// before Firecracker was wired in name none, and ran under QEMU.
func (r Record) HypervisorName() string {
	if r.Hypervisor == "" {
		return hypervisor.QEMU
	}
	return r.Hypervisor
}

// Records keeps execution records in the node's database.
type Records struct{ db *sql.DB }

// NewRecords uses db, migrated by package db.
func NewRecords(db *sql.DB) *Records { return &Records{db: db} }

func unix(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.Unix()
}

// Put writes a record, replacing the one of the same ref but keeping its
// creation time.
func (r *Records) Put(ctx context.Context, rec Record) error {
	fw, err := json.Marshal(rec.Forwards)
	if err != nil {
		return err
	}
	if rec.Forwards == nil {
		fw = []byte("[]")
	}
	var netIndex any
	if rec.NetIndex >= 0 {
		netIndex = rec.NetIndex
	}
	if rec.CreatedAt.IsZero() {
		rec.CreatedAt = time.Now()
	}
	_, err = r.db.ExecContext(ctx, `INSERT INTO executions
		(item_hash, kind, state, hypervisor, vcpus, memory_mib, net_index, tap, ipv4_network, ipv4, ipv6_network, ipv6, vm_dir, forwards, created_at, started_at, stopped_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (item_hash) DO UPDATE SET kind=excluded.kind, state=excluded.state, hypervisor=excluded.hypervisor,
		vcpus=excluded.vcpus, memory_mib=excluded.memory_mib, net_index=excluded.net_index, tap=excluded.tap,
		ipv4_network=excluded.ipv4_network, ipv4=excluded.ipv4, ipv6_network=excluded.ipv6_network, ipv6=excluded.ipv6,
		vm_dir=excluded.vm_dir, forwards=excluded.forwards, started_at=excluded.started_at, stopped_at=excluded.stopped_at`,
		rec.Ref, rec.Kind, rec.State, rec.Hypervisor, rec.VCPUs, rec.MemoryMiB, netIndex, rec.Tap, rec.IPv4Network, rec.IPv4,
		rec.IPv6Network, rec.IPv6, rec.VMDir, string(fw), rec.CreatedAt.Unix(), unix(rec.StartedAt), unix(rec.StoppedAt))
	if err != nil {
		return fmt.Errorf("record execution %s: %w", rec.Ref, err)
	}
	return nil
}

// SetState records a state change.
func (r *Records) SetState(ctx context.Context, ref message.ItemHash, state State) error {
	col := "started_at"
	if state == StateStopped {
		col = "stopped_at"
	}
	_, err := r.db.ExecContext(ctx, `UPDATE executions SET state = ?, `+col+` = ? WHERE item_hash = ?`, state, time.Now().Unix(), ref)
	if err != nil {
		return fmt.Errorf("record execution %s %s: %w", ref, state, err)
	}
	return nil
}

// Delete forgets an execution.
func (r *Records) Delete(ctx context.Context, ref message.ItemHash) error {
	if _, err := r.db.ExecContext(ctx, `DELETE FROM executions WHERE item_hash = ?`, ref); err != nil {
		return fmt.Errorf("forget execution %s: %w", ref, err)
	}
	return nil
}

// ErrNoRecord is returned for an execution the node has no record of.
var ErrNoRecord = errors.New("no such execution")

const recordColumns = `item_hash, kind, state, hypervisor, vcpus, memory_mib, net_index, tap, ipv4_network, ipv4,
	ipv6_network, ipv6, vm_dir, forwards, created_at, started_at, stopped_at`

// Get returns the record of ref.
func (r *Records) Get(ctx context.Context, ref message.ItemHash) (Record, error) {
	rows, err := r.db.QueryContext(ctx, `SELECT `+recordColumns+` FROM executions WHERE item_hash = ?`, ref)
	if err != nil {
		return Record{}, err
	}
	recs, err := scanRecords(rows)
	if err != nil {
		return Record{}, err
	}
	if len(recs) == 0 {
		return Record{}, fmt.Errorf("execution %s: %w", ref, ErrNoRecord)
	}
	return recs[0], nil
}

// List returns every record, or those of one kind.
func (r *Records) List(ctx context.Context, kind Kind) ([]Record, error) {
	q := `SELECT ` + recordColumns + ` FROM executions`
	var args []any
	if kind != "" {
		q += ` WHERE kind = ?`
		args = append(args, kind)
	}
	rows, err := r.db.QueryContext(ctx, q+` ORDER BY created_at, item_hash`, args...)
	if err != nil {
		return nil, err
	}
	return scanRecords(rows)
}

func scanRecords(rows *sql.Rows) ([]Record, error) {
	defer rows.Close()
	var out []Record
	for rows.Next() {
		var rec Record
		var netIndex, started, stopped sql.NullInt64
		var tap, v4net, v4, v6net, v6, dir sql.NullString
		var fw string
		var created int64
		if err := rows.Scan(&rec.Ref, &rec.Kind, &rec.State, &rec.Hypervisor, &rec.VCPUs, &rec.MemoryMiB, &netIndex, &tap,
			&v4net, &v4, &v6net, &v6, &dir, &fw, &created, &started, &stopped); err != nil {
			return nil, fmt.Errorf("read execution records: %w", err)
		}
		rec.NetIndex = -1
		if netIndex.Valid {
			rec.NetIndex = int(netIndex.Int64)
		}
		rec.Tap, rec.IPv4Network, rec.IPv4, rec.IPv6Network, rec.IPv6, rec.VMDir = tap.String, v4net.String, v4.String, v6net.String, v6.String, dir.String
		if err := json.Unmarshal([]byte(fw), &rec.Forwards); err != nil {
			return nil, fmt.Errorf("execution %s: forwards: %w", rec.Ref, err)
		}
		rec.CreatedAt = time.Unix(created, 0)
		if started.Valid {
			rec.StartedAt = time.Unix(started.Int64, 0)
		}
		if stopped.Valid {
			rec.StoppedAt = time.Unix(stopped.Int64, 0)
		}
		out = append(out, rec)
	}
	return out, rows.Err()
}

// EachLive calls fn with every record of kind not recorded stopped (the
// VMs an earlier node process left, running or not), and joins the
// errors, each with its ref: the start-up loops of programs (stopping
// them) and instances (taking them back) go through it.
func (r *Records) EachLive(ctx context.Context, kind Kind, fn func(Record) error) error {
	recs, err := r.List(ctx, kind)
	if err != nil {
		return err
	}
	var errs []error
	for _, rec := range recs {
		if rec.State == StateStopped {
			continue
		}
		if err := fn(rec); err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", kind, rec.Ref, err))
		}
	}
	return errors.Join(errs...)
}
