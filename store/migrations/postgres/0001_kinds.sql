-- The catalogue of resource kinds. Each kind's own table (`r_<kind>`, one typed column per
-- field) and its indexes are created and extended from the kind's metadata when the store
-- opens; this table records what each kind looked like when it was last opened.
CREATE TABLE IF NOT EXISTS stratus_kinds (
    kind       TEXT   PRIMARY KEY,
    fields     JSONB  NOT NULL,
    updated_ms BIGINT NOT NULL
);
