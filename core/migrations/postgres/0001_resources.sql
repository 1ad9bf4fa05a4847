-- Every resource kind lives in one table; declared fields are a JSONB object whose shape the
-- kind's metadata defines. Per-kind expression indexes are created from the metadata at start-up.
CREATE TABLE IF NOT EXISTS resources (
    kind       TEXT   NOT NULL,
    uuid       TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    fields     JSONB  NOT NULL,
    PRIMARY KEY (kind, uuid)
);
