-- The VMs the node runs (package execution): what runs, since when, with
-- which resources and network, so that a restarted node finds them again.

-- +goose Up
CREATE TABLE executions (
    item_hash     TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,            -- program | instance
    state         TEXT NOT NULL,            -- starting | running | stopped
    hypervisor    TEXT NOT NULL,
    vcpus         INTEGER NOT NULL,
    memory_mib    INTEGER NOT NULL,
    net_index     INTEGER,                  -- position of the VM's network in the pool
    tap           TEXT,
    ipv4_network  TEXT,
    ipv4          TEXT,
    ipv6_network  TEXT,
    ipv6          TEXT,
    vm_dir        TEXT,                     -- runtime directory: sockets, pidfile, console
    forwards      TEXT NOT NULL DEFAULT '[]', -- JSON: [{"proto","host_port","guest_port"}]
    created_at    INTEGER NOT NULL,         -- Unix seconds
    started_at    INTEGER,
    stopped_at    INTEGER
);
-- A network index is never held by two VMs that may be running.
CREATE UNIQUE INDEX executions_net_index ON executions (net_index) WHERE state != 'stopped' AND net_index IS NOT NULL;

-- +goose Down
DROP TABLE executions;
