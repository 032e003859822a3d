-- MIMIC-IV core: hosp/patients and hosp/admissions.
-- Inputs: raw_patients, raw_admissions (all VARCHAR, with _line), mimic_patient_rejects (patients rows the CSV
-- reader could not read, with the subject_id Python recovered from them; foresight/sources/mimic_iv.py).
-- Outputs: v_patients, mimic_subjects, mimic_patient_problems, v_admissions, e_patients, e_admissions, and the
-- macro mimic_check_subject that every later MIMIC table checks its subject_id with.
--
-- Required and optional fields. A row is quarantined only when a field it cannot do without fails its check
-- (patients: subject_id, gender, anchor_age, anchor_year; admissions: subject_id, hadm_id, admission_type,
-- admittime, dischtime). An optional field that fails (patients.dod; admissions.deathtime, edregtime, edouttime)
-- is set to NULL and the row is kept: one bad date must not remove a patient and, through the subject check, every
-- row of theirs in every table. The accounting invariant read = loaded + quarantined + dropped counts ROWS, and
-- such a row is loaded, so the field problem is not a quarantine row: ``_field_issue`` names the field, its check
-- and the raw value, and the load reports it in ``warnings`` (count and first lines, Load.finish_table).
--
-- Times are local wall-clock times without a zone (fs_check_local_time): a value with an offset or zone name is
-- rejected (quarantined when required, set to NULL when optional), never silently shifted or stripped.

-- patients: the first row of a subject_id wins; later duplicates are quarantined.
CREATE OR REPLACE TABLE fs_stage.v_patients AS
WITH t AS (
    SELECT _line, subject_id AS sid_raw, fs_id(subject_id) AS subject_id, upper(trim(gender)) AS gender,
           anchor_age AS age_raw, fs_id(anchor_age) AS anchor_age,
           anchor_year AS year_raw, fs_id(anchor_year) AS anchor_year,
           dod AS dod_raw, fs_ts(dod) AS dod_read,
           min(_line) OVER (PARTITION BY fs_id(subject_id)) AS first_line
    FROM raw_patients
), c AS (
    SELECT *,
        coalesce(
            fs_check_local_time('dod', dod_raw, false),
            CASE WHEN year(dod_read) < anchor_year - anchor_age - 1 THEN 'dod before birth: ' || dod_raw END
        ) AS dod_issue
    FROM t
)
SELECT * EXCLUDE (dod_read, dod_issue),
    CASE WHEN dod_issue IS NULL THEN dod_read END AS dod,
    coalesce(
        fs_check_id('subject_id', sid_raw, true),
        CASE WHEN _line <> first_line THEN 'duplicate subject_id (line ' || first_line || ' kept): ' || sid_raw END,
        CASE WHEN gender IS NULL THEN 'missing gender' END,
        fs_check_id('anchor_age', age_raw, true),
        CASE WHEN anchor_age NOT BETWEEN 0 AND 120 THEN 'absurd anchor_age: ' || age_raw END,
        fs_check_id('anchor_year', year_raw, true)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop,
    dod_issue AS _field_issue
FROM c;

-- One row per valid subject. MIMIC gives the age in the anchor year, so birth is 1 Jan of
-- anchor_year - anchor_age (to within a year); ages of 89+ are top-coded, so no birth bound is checked there.
CREATE OR REPLACE TEMP TABLE mimic_subjects AS
SELECT subject_id,
       make_timestamp(anchor_year - anchor_age, 1, 1, 0, 0, 0) AS birth,
       CASE WHEN anchor_age < 89 THEN make_timestamp(anchor_year - anchor_age - 1, 1, 1, 0, 0, 0) END AS birth_floor,
       dod
FROM v_patients WHERE _quarantine IS NULL;

-- Subjects whose patients row was quarantined (unreadable, or a required field failed) and who have no valid
-- row: their rows in other tables are quarantined with that reason, not as "unknown subject_id".
CREATE OR REPLACE TEMP TABLE mimic_patient_problems AS
SELECT subject_id, min(_line) AS line, arg_min(reason, _line) AS reason
FROM (SELECT subject_id, _line, _quarantine AS reason FROM v_patients
      WHERE _quarantine IS NOT NULL AND subject_id IS NOT NULL
      UNION ALL
      SELECT subject_id, line, reason FROM mimic_patient_rejects)
WHERE subject_id NOT IN (SELECT subject_id FROM mimic_subjects)
GROUP BY subject_id;

-- fs_check_subject, telling a subject whose patients row was quarantined from one the patients table lacks.
CREATE OR REPLACE TEMP MACRO mimic_check_subject(raw, known) AS
    coalesce(
        CASE WHEN known IS NULL AND fs_id(raw) IS NOT NULL THEN
            (SELECT 'subject_id ' || fs_id(raw) || ': its patients row was quarantined (line ' || q.line || ': '
                    || q.reason || ')'
             FROM mimic_patient_problems q WHERE q.subject_id = fs_id(raw)) END,
        fs_check_subject(raw, known));

-- admissions
CREATE OR REPLACE TABLE fs_stage.v_admissions AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id AS hadm_raw, fs_id(r.hadm_id) AS hadm_id,
           min(r._line) OVER (PARTITION BY fs_id(r.hadm_id)) AS first_line,
           r.admittime AS admit_raw, fs_ts(r.admittime) AS admittime,
           r.dischtime AS disch_raw, fs_ts(r.dischtime) AS dischtime,
           r.deathtime AS death_raw, r.edregtime AS edreg_raw, r.edouttime AS edout_raw,
           fs_check_local_time('deathtime', r.deathtime, false) AS death_issue,
           fs_check_local_time('edregtime', r.edregtime, false) AS edreg_issue,
           fs_check_local_time('edouttime', r.edouttime, false) AS edout_issue,
           r.admission_type, r.admission_location, r.discharge_location, r.insurance, r.language,
           r.marital_status, r.race
    FROM raw_admissions r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
), c AS (
    SELECT * EXCLUDE (death_issue, edreg_issue, edout_issue),
        CASE WHEN death_issue IS NULL THEN fs_ts(death_raw) END AS deathtime,
        CASE WHEN edreg_issue IS NULL THEN fs_ts(edreg_raw) END AS edregtime,
        CASE WHEN edout_issue IS NULL THEN fs_ts(edout_raw) END AS edouttime,
        nullif(concat_ws('; ', death_issue, edreg_issue, edout_issue), '') AS _field_issue
    FROM t
)
SELECT * EXCLUDE (_field_issue),
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('hadm_id', hadm_raw, true),
        CASE WHEN _line <> first_line THEN 'duplicate hadm_id (line ' || first_line || ' kept): ' || hadm_raw END,
        CASE WHEN admission_type IS NULL THEN 'missing admission_type' END,
        fs_check_local_time('admittime', admit_raw, true),
        fs_check_local_time('dischtime', disch_raw, true),
        fs_check_order('admittime', admittime, 'dischtime', dischtime),
        fs_check_birth(least(admittime, edregtime), birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop,
    _field_issue
FROM c;

CREATE OR REPLACE TEMP VIEW e_admissions AS
WITH a AS (SELECT * FROM v_admissions WHERE _quarantine IS NULL)
SELECT _line, subject_id, edregtime AS time, 'ED//REGISTRATION' AS code, NULL::FLOAT AS numeric_value,
       NULL AS text_value, NULL AS unit, hadm_id::VARCHAR AS encounter_id FROM a WHERE edregtime IS NOT NULL
UNION ALL
SELECT _line, subject_id, edouttime, 'ED//OUT', NULL, NULL, NULL, hadm_id::VARCHAR FROM a WHERE edouttime IS NOT NULL
UNION ALL
-- Admission class: MIMIC's nine admission types collapse to the classes every source shares; the exact
-- type and the admission location stay in text_value.
SELECT _line, subject_id, admittime,
       'ADMIT//' || CASE
           WHEN admission_type IN ('EW EMER.', 'DIRECT EMER.') THEN 'EMERGENCY'
           WHEN admission_type = 'URGENT' THEN 'URGENT'
           WHEN admission_type = 'ELECTIVE' THEN 'ELECTIVE'
           WHEN admission_type = 'SURGICAL SAME DAY ADMISSION' THEN 'SURGICAL_SAME_DAY'
           WHEN admission_type LIKE '%OBSERVATION%' THEN 'OBSERVATION'
           ELSE fs_part(admission_type) END,
       NULL, admission_type || ' | ' || coalesce(admission_location, 'UNK'), NULL, hadm_id::VARCHAR
FROM a
UNION ALL
SELECT _line, subject_id, admittime, 'INSURANCE//' || fs_part(insurance), NULL, NULL, NULL, hadm_id::VARCHAR
FROM a WHERE insurance IS NOT NULL
UNION ALL
SELECT _line, subject_id, admittime, 'LANGUAGE//' || fs_part(language), NULL, NULL, NULL, hadm_id::VARCHAR
FROM a WHERE language IS NOT NULL
UNION ALL
SELECT _line, subject_id, admittime, 'MARITAL//' || fs_part(marital_status), NULL, NULL, NULL, hadm_id::VARCHAR
FROM a WHERE marital_status IS NOT NULL
UNION ALL
SELECT _line, subject_id, admittime, 'RACE//' || fs_part(race), NULL, NULL, NULL, hadm_id::VARCHAR
FROM a WHERE race IS NOT NULL
UNION ALL
SELECT _line, subject_id, dischtime, 'DISCHARGE//' || fs_part(discharge_location), NULL, NULL, NULL,
       hadm_id::VARCHAR
FROM a;

-- patients' events. Death: the precise in-hospital deathtime when an admission records one, else dod.
CREATE OR REPLACE TEMP VIEW e_patients AS
WITH p AS (SELECT * FROM v_patients WHERE _quarantine IS NULL),
     d AS (SELECT subject_id, min(deathtime) AS deathtime FROM v_admissions
           WHERE _quarantine IS NULL AND deathtime IS NOT NULL GROUP BY subject_id)
SELECT _line, subject_id, NULL::TIMESTAMP AS time, 'GENDER//' || fs_part(gender) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, NULL AS encounter_id FROM p
UNION ALL
SELECT _line, subject_id, make_timestamp(anchor_year - anchor_age, 1, 1, 0, 0, 0), 'MEDS_BIRTH',
       NULL, NULL, NULL, NULL FROM p
UNION ALL
SELECT p._line, p.subject_id, coalesce(d.deathtime, p.dod), 'MEDS_DEATH', NULL, NULL, NULL, NULL
FROM p LEFT JOIN d USING (subject_id)
WHERE coalesce(d.deathtime, p.dod) IS NOT NULL;
