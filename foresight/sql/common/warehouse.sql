-- Every warehouse table (the data contracts of foresight.schema: MEDS core columns first, then Foresight's
-- extras and lineage). Run by foresight.warehouse.connect() on every writable connection; IF NOT EXISTS keeps it
-- idempotent.
CREATE TABLE IF NOT EXISTS events (
    subject_id    BIGINT    NOT NULL,
    time          TIMESTAMP,              -- NULL only for static facts
    code          VARCHAR   NOT NULL,
    numeric_value FLOAT,
    text_value    VARCHAR,
    unit          VARCHAR,
    encounter_id  VARCHAR,
    source        VARCHAR   NOT NULL,     -- the load that owns this row (replaced on re-load)
    source_table  VARCHAR   NOT NULL,     -- input table/file it came from
    load_id       VARCHAR   NOT NULL      -- etl_runs.run_id
);

CREATE TABLE IF NOT EXISTS codes (
    code         VARCHAR PRIMARY KEY,
    description  VARCHAR,
    kind         VARCHAR NOT NULL,
    parent_codes VARCHAR[],               -- ancestors, nearest first, in Foresight code form
    source       VARCHAR
);

CREATE TABLE IF NOT EXISTS subject_splits (
    subject_id BIGINT PRIMARY KEY,
    split      VARCHAR NOT NULL CHECK (split IN ('train', 'tuning', 'held_out'))
);

CREATE TABLE IF NOT EXISTS subject_map (
    source     VARCHAR NOT NULL,
    source_id  VARCHAR NOT NULL,
    subject_id BIGINT  NOT NULL,
    PRIMARY KEY (source, source_id)
);

CREATE TABLE IF NOT EXISTS etl_runs (
    run_id           VARCHAR PRIMARY KEY,
    source           VARCHAR   NOT NULL,
    source_kind      VARCHAR   NOT NULL,  -- mimic-iv, synthea, fhir, meds, notes, simulator
    input_path       VARCHAR   NOT NULL,
    input_checksums  JSON      NOT NULL,  -- {relative file: sha256}
    started_at       TIMESTAMP NOT NULL,
    finished_at      TIMESTAMP NOT NULL,
    rows_read        BIGINT    NOT NULL,
    rows_loaded      BIGINT    NOT NULL,
    rows_quarantined BIGINT    NOT NULL,
    rows_dropped     BIGINT    NOT NULL,
    dropped_reasons  JSON      NOT NULL,  -- {reason: rows}
    events_loaded    BIGINT    NOT NULL,
    subjects         BIGINT    NOT NULL,
    missing_tables   JSON      NOT NULL,  -- optional inputs that were absent
    foresight_version VARCHAR  NOT NULL
);

CREATE TABLE IF NOT EXISTS etl_tables (
    run_id           VARCHAR NOT NULL,
    source_table     VARCHAR NOT NULL,
    file             VARCHAR NOT NULL,
    sha256           VARCHAR NOT NULL,
    rows_read        BIGINT  NOT NULL,
    rows_loaded      BIGINT  NOT NULL,
    rows_quarantined BIGINT  NOT NULL,
    rows_dropped     BIGINT  NOT NULL,
    events           BIGINT  NOT NULL
);

-- Who provided each load and what it may be used for (foresight.purposes), written in the load's transaction.
-- A load without a declaration has provider 'undeclared' and purposes ['unspecified']; so does a run_id with no
-- row here (loads made before this table existed).
CREATE TABLE IF NOT EXISTS load_declarations (
    run_id             VARCHAR   PRIMARY KEY,  -- etl_runs.run_id
    provider           VARCHAR   NOT NULL,
    controller         VARCHAR,
    purposes           VARCHAR[] NOT NULL,     -- lower-case slugs; a run's purpose must be one of them exactly
    expires            DATE,                   -- last day the declaration covers anything (NULL: no end)
    declaration_file   VARCHAR,
    declaration_sha256 VARCHAR,                -- of the declarations file's bytes
    opt_out_sha256     VARCHAR,                -- foresight.optout.digest of the opt-out list honoured (NULL: none)
    declared_at        TIMESTAMP NOT NULL
);

-- Free-text clinical notes (FHIR DocumentReference text, decoded), for the notes source to annotate. ``time`` is
-- when the note became available (leak-free, like events); rows are replaced per source on re-load.
CREATE TABLE IF NOT EXISTS notes (
    subject_id   BIGINT  NOT NULL,
    time         TIMESTAMP,
    note_id      VARCHAR NOT NULL,        -- the source's document id
    note_type    VARCHAR,                 -- e.g. LOINC//34117-2 (History and physical note)
    encounter_id VARCHAR,
    text         VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    source_table VARCHAR NOT NULL,
    load_id      VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS quarantine (
    run_id       VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    source_file  VARCHAR NOT NULL,
    row_number   BIGINT,                  -- 1-based line in the file (header = line 1); NULL if unknown
    reason       VARCHAR NOT NULL,
    raw          VARCHAR                  -- the offending row as read (never altered)
);
