-- The content store (package store): messages by item hash, and the files
-- it holds by the item hash a STORE message names.

-- +goose Up
CREATE TABLE store_messages (
    item_hash  TEXT PRIMARY KEY,
    type       TEXT NOT NULL,
    sender     TEXT NOT NULL,
    address    TEXT NOT NULL,  -- content.address: the owner amends are matched by
    ref        TEXT,           -- STORE content.ref: the message this one amends
    file_hash  TEXT,           -- STORE content.item_hash: the file named
    time       REAL NOT NULL,  -- envelope time, Unix seconds
    local      INTEGER NOT NULL, -- created on this node, unsigned
    raw        BLOB NOT NULL,  -- the message as received
    stored_at  INTEGER NOT NULL
);
CREATE INDEX store_messages_amends ON store_messages (ref, address, time) WHERE ref IS NOT NULL;
CREATE INDEX store_messages_file ON store_messages (file_hash) WHERE file_hash IS NOT NULL;

CREATE TABLE store_files (
    item_hash  TEXT PRIMARY KEY, -- sha256 hex or IPFS CID
    sha256     TEXT NOT NULL,    -- the blob is files/<sha256>
    size       INTEGER NOT NULL,
    verified   INTEGER NOT NULL, -- 0: an IPFS item whose bytes were not checked against its CID
    local      INTEGER NOT NULL, -- added on this node: never evicted, it cannot be fetched again
    last_used  INTEGER NOT NULL, -- Unix nanoseconds, for LRU eviction
    added_at   INTEGER NOT NULL
);
CREATE INDEX store_files_lru ON store_files (local, last_used);
CREATE INDEX store_files_sha256 ON store_files (sha256);

-- +goose Down
DROP TABLE store_files;
DROP TABLE store_messages;
