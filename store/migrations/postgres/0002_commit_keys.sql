-- The idempotency keys of applied batches, each with what its commit answered (the versions,
-- a JSON array): a batch committed again with a remembered key is answered from here, not
-- applied twice (a retry of a commit whose answer was lost). Pruned past the retention.
CREATE TABLE IF NOT EXISTS stratus_commit_keys (
    key      TEXT   PRIMARY KEY,
    versions TEXT   NOT NULL,
    at_ms    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS stratus_commit_keys_at ON stratus_commit_keys (at_ms);
