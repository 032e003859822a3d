-- MIMIC-IV ward movements: hosp/transfers (TRANSFER//<eventtype>//<careunit> at intime) and
-- hosp/services (SERVICE//<curr_service> at transfertime).

-- sliced by line: raw_transfers
CREATE OR REPLACE TABLE fs_stage.v_transfers AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.eventtype, r.careunit, r.intime AS in_raw, fs_ts(r.intime) AS intime,
           r.outtime AS out_raw, fs_ts(r.outtime) AS outtime
    FROM raw_transfers r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        CASE WHEN eventtype IS NULL THEN 'missing eventtype' END,
        fs_check_local_time('intime', in_raw, true),
        fs_check_local_time('outtime', out_raw, false),
        fs_check_order('intime', intime, 'outtime', outtime),
        fs_check_birth(intime, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_transfers AS
SELECT _line, subject_id, intime AS time, 'TRANSFER//' || fs_part(eventtype) || '//' || fs_part(careunit) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, hadm_id AS encounter_id
FROM v_transfers WHERE _quarantine IS NULL;

-- sliced by line: raw_services
CREATE OR REPLACE TABLE fs_stage.v_services AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.curr_service, r.prev_service, r.transfertime AS time_raw,
           fs_ts(r.transfertime) AS time
    FROM raw_services r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        CASE WHEN curr_service IS NULL THEN 'missing curr_service' END,
        fs_check_local_time('transfertime', time_raw, true),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_services AS
SELECT _line, subject_id, time, 'SERVICE//' || fs_part(curr_service) AS code, NULL::FLOAT AS numeric_value,
       prev_service AS text_value, NULL AS unit, hadm_id AS encounter_id
FROM v_services WHERE _quarantine IS NULL;
