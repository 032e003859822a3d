-- MIMIC-IV billing codes: hosp/diagnoses_icd, procedures_icd, drgcodes, hcpcsevents.
-- Leak-free timing: these codes are assigned by coders after the stay, so every one is timed at the
-- admission's DISCHARGE time (never admittime: timing diagnoses at admission leaks the outcome into the
-- admission's own prediction). A code whose hadm_id has no valid admission cannot be timed: quarantined.

CREATE OR REPLACE TEMP TABLE mimic_stays AS
SELECT hadm_id, subject_id, dischtime FROM v_admissions WHERE _quarantine IS NULL;

CREATE OR REPLACE TEMP MACRO mimic_check_stay(hadm_raw, stay_subject, row_subject) AS
    coalesce(fs_check_id('hadm_id', hadm_raw, true),
             CASE WHEN stay_subject IS NULL THEN 'hadm_id not in admissions (cannot be timed): ' || hadm_raw
                  WHEN stay_subject <> row_subject THEN 'hadm_id belongs to another subject: ' || hadm_raw END);

-- diagnoses_icd -> DX//ICD9CM//<code> | DX//ICD10CM//<code>
-- sliced by line: raw_diagnoses_icd
CREATE OR REPLACE TABLE fs_stage.v_diagnoses_icd AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           r.hadm_id AS hadm_raw, a.subject_id AS stay_subject, a.dischtime,
           upper(trim(r.icd_code)) AS icd_code, trim(r.icd_version) AS icd_version
    FROM raw_diagnoses_icd r
    LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
    LEFT JOIN mimic_stays a ON a.hadm_id = fs_id(r.hadm_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        mimic_check_stay(hadm_raw, stay_subject, subject_id),
        CASE WHEN icd_code IS NULL THEN 'missing icd_code' END,
        CASE WHEN icd_version IS DISTINCT FROM '9' AND icd_version IS DISTINCT FROM '10'
             THEN 'unknown icd_version: ' || coalesce(icd_version, 'NULL') END
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_diagnoses_icd AS
SELECT _line, subject_id, dischtime AS time, 'DX//ICD' || icd_version || 'CM//' || icd_code AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, hadm_raw AS encounter_id
FROM v_diagnoses_icd WHERE _quarantine IS NULL;

-- procedures_icd -> PX//ICD9PROC//<code> | PX//ICD10PCS//<code> (chartdate is checked, the code is timed at discharge)
-- sliced by line: raw_procedures_icd
CREATE OR REPLACE TABLE fs_stage.v_procedures_icd AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           r.hadm_id AS hadm_raw, a.subject_id AS stay_subject, a.dischtime, r.chartdate AS chartdate_raw,
           upper(trim(r.icd_code)) AS icd_code, trim(r.icd_version) AS icd_version
    FROM raw_procedures_icd r
    LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
    LEFT JOIN mimic_stays a ON a.hadm_id = fs_id(r.hadm_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        mimic_check_stay(hadm_raw, stay_subject, subject_id),
        fs_check_local_time('chartdate', chartdate_raw, false),
        CASE WHEN icd_code IS NULL THEN 'missing icd_code' END,
        CASE WHEN icd_version IS DISTINCT FROM '9' AND icd_version IS DISTINCT FROM '10'
             THEN 'unknown icd_version: ' || coalesce(icd_version, 'NULL') END
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_procedures_icd AS
SELECT _line, subject_id, dischtime AS time,
       CASE icd_version WHEN '9' THEN 'PX//ICD9PROC//' ELSE 'PX//ICD10PCS//' END || icd_code AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, hadm_raw AS encounter_id
FROM v_procedures_icd WHERE _quarantine IS NULL;

-- drgcodes -> DRG//MSDRG//<3-digit code> (HCFA) | DRG//APRDRG//<code>; APR severity in numeric_value.
-- sliced by line: raw_drgcodes
CREATE OR REPLACE TABLE fs_stage.v_drgcodes AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           r.hadm_id AS hadm_raw, a.subject_id AS stay_subject, a.dischtime,
           upper(trim(r.drg_type)) AS drg_type, trim(r.drg_code) AS drg_code, r.description,
           r.drg_severity AS severity_raw
    FROM raw_drgcodes r
    LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
    LEFT JOIN mimic_stays a ON a.hadm_id = fs_id(r.hadm_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        mimic_check_stay(hadm_raw, stay_subject, subject_id),
        CASE WHEN drg_code IS NULL THEN 'missing drg_code' END,
        CASE WHEN drg_type IS NULL THEN 'missing drg_type' END,
        fs_check_num('drg_severity', severity_raw, true)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_drgcodes AS
SELECT _line, subject_id, dischtime AS time,
       'DRG//' || CASE drg_type WHEN 'HCFA' THEN 'MSDRG' WHEN 'APR' THEN 'APRDRG' ELSE fs_part(drg_type) END
           || '//' || lpad(drg_code, 3, '0') AS code,
       fs_num(severity_raw)::FLOAT AS numeric_value, description AS text_value, NULL AS unit,
       hadm_raw AS encounter_id
FROM v_drgcodes WHERE _quarantine IS NULL;

-- hcpcsevents -> PX//HCPCS//<code>, billed at discharge.
-- sliced by line: raw_hcpcsevents
CREATE OR REPLACE TABLE fs_stage.v_hcpcsevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           r.hadm_id AS hadm_raw, a.subject_id AS stay_subject, a.dischtime, r.chartdate AS chartdate_raw,
           upper(trim(r.hcpcs_cd)) AS hcpcs_cd, r.short_description
    FROM raw_hcpcsevents r
    LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
    LEFT JOIN mimic_stays a ON a.hadm_id = fs_id(r.hadm_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        mimic_check_stay(hadm_raw, stay_subject, subject_id),
        fs_check_local_time('chartdate', chartdate_raw, false),
        CASE WHEN hcpcs_cd IS NULL THEN 'missing hcpcs_cd' END
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_hcpcsevents AS
SELECT _line, subject_id, dischtime AS time, 'PX//HCPCS//' || fs_part(hcpcs_cd) AS code,
       NULL::FLOAT AS numeric_value, short_description AS text_value, NULL AS unit, hadm_raw AS encounter_id
FROM v_hcpcsevents WHERE _quarantine IS NULL;
