-- Synthea CSV clinical tables: conditions, medications, procedures, immunizations, allergies, careplans, devices,
-- imaging_studies. Inputs: raw_<table> (VARCHAR), synthea_subjects, synthea_encounters (core.sql).
-- Each v_<table> joins the patient (unknown -> quarantined) and the encounter (another patient's -> quarantined;
-- absent -> the row's own time is used). Times are UTC; see ehr_macros.sql for the date-only rule.

-- conditions -> DX//SNOMED//<code> when known: by the end of the encounter that recorded it (an inpatient stay:
-- discharge), or the onset day if that is later (ehr_known_after); DX_END//SNOMED//<code> at STOP (known by the
-- end of that day, ehr_known), never before the diagnosis itself was known. The CSV has only the onset DATE:
-- Synthea's FHIR export shows most onsets minutes after the recording encounter ends (the condition is added by
-- a module that runs after the visit closes); a date cannot tell that, and the encounter's end is kept.
-- sliced by line: raw_conditions
CREATE OR REPLACE TABLE fs_stage.v_conditions AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.START AS start_raw, r.STOP AS stop_raw,
           ehr_known_after(e.stop, r.START) AS time, ehr_known(r.STOP) AS stop,
           nullif(trim(r.CODE), '') AS code_raw, ehr_vocab(coalesce(nullif(trim(r.SYSTEM), ''), 'SNOMED-CT')) AS vocab,
           r.DESCRIPTION AS description
    FROM raw_conditions r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('START', start_raw, true),
        fs_check_time('STOP', stop_raw, false),
        fs_check_order('START', fs_ts_utc(start_raw), 'STOP', fs_ts_utc(stop_raw)),
        ehr_check_future('START', start_raw),
        ehr_check_future('STOP', stop_raw),
        fs_check_birth(fs_ts_utc(start_raw), birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_conditions AS
SELECT _line, subject_id, time, 'DX//' || vocab || '//' || fs_part(code_raw) AS code, NULL::FLOAT AS numeric_value,
       NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_conditions WHERE _quarantine IS NULL
UNION ALL
SELECT _line, subject_id, greatest(stop, time), 'DX_END//' || vocab || '//' || fs_part(code_raw), NULL, NULL, NULL,
       enc_raw
FROM v_conditions WHERE _quarantine IS NULL AND stop IS NOT NULL;

-- medications -> RX_START//RXNORM//<code> at START (the order is known when it is written), RX_STOP at STOP.
-- sliced by line: raw_medications
CREATE OR REPLACE TABLE fs_stage.v_medications AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.START AS start_raw, r.STOP AS stop_raw,
           ehr_known(r.START) AS start, ehr_known(r.STOP) AS stop,
           nullif(trim(r.CODE), '') AS code_raw, r.DESCRIPTION AS description
    FROM raw_medications r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('START', start_raw, true),
        fs_check_time('STOP', stop_raw, false),
        fs_check_order('START', start, 'STOP', stop),
        ehr_check_future('START', start_raw),
        ehr_check_future('STOP', stop_raw),
        fs_check_birth(start, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_medications AS
SELECT _line, subject_id, start AS time, 'RX_START//RXNORM//' || fs_part(code_raw) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_medications WHERE _quarantine IS NULL
UNION ALL
SELECT _line, subject_id, stop, 'RX_STOP//RXNORM//' || fs_part(code_raw), NULL, NULL, NULL, enc_raw
FROM v_medications WHERE _quarantine IS NULL AND stop IS NOT NULL;

-- procedures -> PX//SNOMED//<code>, known when the procedure is over (STOP; START when no STOP). Synthea
-- exports before 2.7 have DATE instead of START/STOP.
-- sliced by line: raw_procedures
CREATE OR REPLACE TABLE fs_stage.v_procedures AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, coalesce(r.START, r.DATE) AS start_raw, r.STOP AS stop_raw,
           ehr_known(coalesce(r.START, r.DATE)) AS start, ehr_known(r.STOP) AS stop,
           nullif(trim(r.CODE), '') AS code_raw, ehr_vocab(coalesce(nullif(trim(r.SYSTEM), ''), 'SNOMED-CT')) AS vocab,
           r.DESCRIPTION AS description
    FROM raw_procedures r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('START', start_raw, true),
        fs_check_time('STOP', stop_raw, false),
        fs_check_order('START', start, 'STOP', stop),
        ehr_check_future('START', start_raw),
        ehr_check_future('STOP', stop_raw),
        fs_check_birth(start, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_procedures AS
SELECT _line, subject_id, coalesce(stop, start) AS time, 'PX//' || vocab || '//' || fs_part(code_raw) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_procedures WHERE _quarantine IS NULL;

-- immunizations -> IMMUNIZATION//CVX//<code> at DATE.
-- sliced by line: raw_immunizations
CREATE OR REPLACE TABLE fs_stage.v_immunizations AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.DATE AS date_raw, ehr_known(r.DATE) AS time,
           nullif(trim(r.CODE), '') AS code_raw, r.DESCRIPTION AS description
    FROM raw_immunizations r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('DATE', date_raw, true),
        ehr_check_future('DATE', date_raw),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_immunizations AS
SELECT _line, subject_id, time, 'IMMUNIZATION//CVX//' || fs_part(code_raw) AS code, NULL::FLOAT AS numeric_value,
       NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_immunizations WHERE _quarantine IS NULL;

-- allergies -> ALLERGY//<SNOMED|RXNORM>//<code>, known like a diagnosis (by the end of the recording encounter).
-- sliced by line: raw_allergies
CREATE OR REPLACE TABLE fs_stage.v_allergies AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.START AS start_raw, ehr_known_after(e.stop, r.START) AS time,
           nullif(trim(r.CODE), '') AS code_raw, ehr_vocab(coalesce(nullif(trim(r.SYSTEM), ''), 'SNOMED-CT')) AS vocab,
           r.DESCRIPTION AS description
    FROM raw_allergies r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('START', start_raw, true),
        ehr_check_future('START', start_raw),
        fs_check_birth(fs_ts_utc(start_raw), birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_allergies AS
SELECT _line, subject_id, time, 'ALLERGY//' || vocab || '//' || fs_part(code_raw) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_allergies WHERE _quarantine IS NULL;

-- careplans -> CAREPLAN//SNOMED//<code> known like a diagnosis; CAREPLAN_END//SNOMED//<code> at STOP.
-- sliced by line: raw_careplans
CREATE OR REPLACE TABLE fs_stage.v_careplans AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.START AS start_raw, r.STOP AS stop_raw,
           ehr_known_after(e.stop, r.START) AS time, ehr_known(r.STOP) AS stop,
           nullif(trim(r.CODE), '') AS code_raw, r.DESCRIPTION AS description
    FROM raw_careplans r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('START', start_raw, true),
        fs_check_time('STOP', stop_raw, false),
        fs_check_order('START', fs_ts_utc(start_raw), 'STOP', fs_ts_utc(stop_raw)),
        ehr_check_future('START', start_raw),
        ehr_check_future('STOP', stop_raw),
        fs_check_birth(fs_ts_utc(start_raw), birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_careplans AS
SELECT _line, subject_id, time, 'CAREPLAN//SNOMED//' || fs_part(code_raw) AS code, NULL::FLOAT AS numeric_value,
       NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_careplans WHERE _quarantine IS NULL
UNION ALL
SELECT _line, subject_id, greatest(stop, time), 'CAREPLAN_END//SNOMED//' || fs_part(code_raw), NULL, NULL, NULL,
       enc_raw
FROM v_careplans WHERE _quarantine IS NULL AND stop IS NOT NULL;

-- devices -> DEVICE//SNOMED//<code> at START, DEVICE_END//SNOMED//<code> at STOP.
-- sliced by line: raw_devices
CREATE OR REPLACE TABLE fs_stage.v_devices AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.START AS start_raw, r.STOP AS stop_raw,
           ehr_known(r.START) AS start, ehr_known(r.STOP) AS stop,
           nullif(trim(r.CODE), '') AS code_raw, r.DESCRIPTION AS description
    FROM raw_devices r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('START', start_raw, true),
        fs_check_time('STOP', stop_raw, false),
        fs_check_order('START', start, 'STOP', stop),
        ehr_check_future('START', start_raw),
        ehr_check_future('STOP', stop_raw),
        fs_check_birth(start, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_devices AS
SELECT _line, subject_id, start AS time, 'DEVICE//SNOMED//' || fs_part(code_raw) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_devices WHERE _quarantine IS NULL
UNION ALL
SELECT _line, subject_id, stop, 'DEVICE_END//SNOMED//' || fs_part(code_raw), NULL, NULL, NULL, enc_raw
FROM v_devices WHERE _quarantine IS NULL AND stop IS NOT NULL;

-- imaging_studies: one CSV row per image instance; one IMAGING//<modality>//<body site> event per series (the
-- first row of a study Id + SERIES_UID), the other instances of that series are dropped with that reason.
CREATE OR REPLACE TABLE fs_stage.v_imaging_studies AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.DATE AS date_raw, ehr_known(r.DATE) AS time,
           nullif(trim(r.MODALITY_CODE), '') AS modality, nullif(trim(r.BODYSITE_CODE), '') AS bodysite,
           r.MODALITY_DESCRIPTION AS modality_description, r.BODYSITE_DESCRIPTION AS bodysite_description,
           min(r._line) OVER (PARTITION BY coalesce(r.Id, r._line::VARCHAR), r.SERIES_UID) AS first_line
    FROM raw_imaging_studies r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN modality IS NULL THEN 'missing MODALITY_CODE' END,
        CASE WHEN bodysite IS NULL THEN 'missing BODYSITE_CODE' END,
        fs_check_time('DATE', date_raw, true),
        ehr_check_future('DATE', date_raw),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    CASE WHEN _line <> first_line THEN 'another image of the same series (one event per series)' END AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_imaging_studies AS
SELECT _line, subject_id, time, 'IMAGING//' || fs_part(modality) || '//' || fs_part(bodysite) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_raw AS encounter_id
FROM v_imaging_studies WHERE _quarantine IS NULL AND _line = first_line;
