-- The staging area of one load (foresight.warehouse.Load): rows wait here, outside any transaction, until
-- publish moves them into the warehouse tables in one transaction. fs_stage is the load's staging database FILE
-- (beside the warehouse, deleted after the commit), so staged rows are on disk, not in memory, however big the load.
CREATE OR REPLACE TABLE fs_stage.staged_events AS SELECT * FROM events LIMIT 0;
-- source_table: which input table staged the row, so a retried table can forget exactly its own rows
-- (multi-file tables name a different source_file per row)
CREATE OR REPLACE TABLE fs_stage.staged_quarantine AS
    SELECT *, NULL::VARCHAR AS source_table FROM quarantine LIMIT 0;
CREATE OR REPLACE TABLE fs_stage.staged_codes (
    code VARCHAR, description VARCHAR, parent_codes VARCHAR[], priority INTEGER);
CREATE OR REPLACE TABLE fs_stage.staged_notes AS SELECT * FROM notes LIMIT 0;
CREATE OR REPLACE TABLE fs_stage.staged_subject_map AS SELECT * FROM subject_map LIMIT 0;
CREATE OR REPLACE TABLE fs_stage.staged_splits AS SELECT * FROM subject_splits LIMIT 0;
-- national data opt-out: subject ids whose rows are dropped
CREATE OR REPLACE TEMP TABLE fs_optout (subject_id BIGINT PRIMARY KEY);
