-- Every resource kind lives in one table; declared fields are a JSON object whose shape the
-- kind's metadata defines. Per-kind expression indexes are created from the metadata at start-up.
CREATE TABLE IF NOT EXISTS resources (
    kind       TEXT    NOT NULL,
    uuid       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    fields     TEXT    NOT NULL,
    PRIMARY KEY (kind, uuid)
) WITHOUT ROWID;
