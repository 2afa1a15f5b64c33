package firecracker

import (
	"context"
	"net/http"
	"net/url"
	"slices"
)

// SnapshotLoad is how a fresh Firecracker process loads a snapshot (a
// template's, under a program VM's own identity).
type SnapshotLoad struct {
	// StatePath and MemPath are the snapshot's files; the memory file is
	// mapped private: pages are shared with every VM loaded from it until
	// written.
	StatePath, MemPath string
	// Taps replace the snapshot's NICs' host devices, by interface id.
	Taps map[string]string
	// VsockSocket replaces the vsock device's unix socket, if set.
	VsockSocket string
}

// snapshotLoadParams is SnapshotLoadParams of the API.
type snapshotLoadParams struct {
	SnapshotPath     string            `json:"snapshot_path"`
	MemBackend       memoryBackend     `json:"mem_backend"`
	ResumeVM         bool              `json:"resume_vm"`
	NetworkOverrides []networkOverride `json:"network_overrides,omitempty"`
	VsockOverride    *vsockOverride    `json:"vsock_override,omitempty"`
}

type memoryBackend struct {
	BackendType string `json:"backend_type"`
	BackendPath string `json:"backend_path"`
}

type networkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

type vsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// CreateSnapshot writes a full snapshot of a paused VM: its device and
// vCPU state to statePath, its memory to memPath (Pause it first).
func (c *Client) CreateSnapshot(ctx context.Context, statePath, memPath string) error {
	return c.do(ctx, http.MethodPut, "/snapshot/create", map[string]string{
		"snapshot_type": "Full", "snapshot_path": statePath, "mem_file_path": memPath,
	}, nil)
}

// LoadSnapshot loads a snapshot into a Firecracker process that has been
// given nothing else, leaving the VM paused: its drives can then be
// pointed at the VM's own files (UpdateDrive) before Resume.
func (c *Client) LoadSnapshot(ctx context.Context, l SnapshotLoad) error {
	p := snapshotLoadParams{
		SnapshotPath: l.StatePath,
		MemBackend:   memoryBackend{BackendType: "File", BackendPath: l.MemPath},
	}
	for id, tap := range sortedMap(l.Taps) {
		p.NetworkOverrides = append(p.NetworkOverrides, networkOverride{IfaceID: id, HostDevName: tap})
	}
	if l.VsockSocket != "" {
		p.VsockOverride = &vsockOverride{UDSPath: l.VsockSocket}
	}
	return c.do(ctx, http.MethodPut, "/snapshot/load", p, nil)
}

// UpdateDrive points a drive of a VM at another file (after a snapshot's
// load, before the guest resumes: the template's placeholder replaced by
// the VM's own drive).
func (c *Client) UpdateDrive(ctx context.Context, id, path string) error {
	return c.do(ctx, http.MethodPatch, "/drives/"+url.PathEscape(id), map[string]string{"drive_id": id, "path_on_host": path}, nil)
}

// sortedMap iterates m in key order, so that requests are the same bytes
// for the same load.
func sortedMap(m map[string]string) func(func(string, string) bool) {
	return func(yield func(string, string) bool) {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if !yield(k, m[k]) {
				return
			}
		}
	}
}
