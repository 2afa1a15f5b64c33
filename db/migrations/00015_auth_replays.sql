-- The scheduler's signed calls already accepted (package auth), kept until
-- their signature's time window has passed, so that a restarted node
-- refuses a replay too.

-- +goose Up
CREATE TABLE auth_replays (
    payload_sha256 BLOB PRIMARY KEY,
    expires_at     INTEGER NOT NULL  -- Unix nanoseconds
) WITHOUT ROWID;
CREATE INDEX auth_replays_expiry ON auth_replays (expires_at);

-- +goose Down
DROP TABLE auth_replays;
