-- MEDS data shards -> events, kept as they are. Input: raw_data(_line, _source_file, _source_row, subject_id, time,
-- code, numeric_value DOUBLE, text_value, unit, encounter_id). Outputs: v_data, e_data.
-- A MEDS time is already "when it became known" by the contract of the dataset's ETL; it is kept. Rows that no
-- MEDS reader could use are quarantined with their shard and row: no subject, no code, a value that is not a
-- finite float32, a time before the subject's own MEDS_BIRTH.

CREATE OR REPLACE TABLE fs_stage.v_data AS
WITH b AS (
    SELECT subject_id, min(time) AS birth FROM raw_data WHERE code = 'MEDS_BIRTH' AND time IS NOT NULL GROUP BY 1
)
SELECT r._line, r._source_file, r._source_row, r.subject_id, r.time, r.code, r.numeric_value, r.text_value,
       r.unit, r.encounter_id,
    coalesce(
        CASE WHEN r.subject_id IS NULL THEN 'missing subject_id' END,
        CASE WHEN r.code IS NULL OR trim(r.code) = '' THEN 'missing code' END,
        CASE WHEN NOT isfinite(r.numeric_value) THEN 'non-finite numeric_value: ' || r.numeric_value
             WHEN abs(r.numeric_value) > 3.4028234663852886e38
             THEN 'numeric_value does not fit float32: ' || r.numeric_value END,
        CASE WHEN r.time < b.birth
             THEN 'time before MEDS_BIRTH (' || strftime(b.birth, '%Y-%m-%d %H:%M:%S') || '): '
                  || strftime(r.time, '%Y-%m-%d %H:%M:%S') END
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM raw_data r LEFT JOIN b USING (subject_id);

CREATE OR REPLACE TEMP VIEW e_data AS
SELECT _line, subject_id, time, code, numeric_value::FLOAT AS numeric_value, text_value, unit,
       encounter_id
FROM v_data WHERE _quarantine IS NULL;
