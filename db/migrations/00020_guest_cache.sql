-- The guest API's cache (package guestapi): what programs keep with the
-- Aleph SDK's VmCache, namespaced by program, each entry with its expiry.
-- The reference keeps it in Redis; the node keeps it here, bounded.

-- +goose Up
CREATE TABLE guest_cache (
    namespace  TEXT    NOT NULL,  -- the program's item hash
    key        TEXT    NOT NULL,
    value      BLOB    NOT NULL,
    expires_at INTEGER NOT NULL,  -- Unix nanoseconds
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX guest_cache_expiry ON guest_cache (expires_at);

-- +goose Down
DROP TABLE guest_cache;
