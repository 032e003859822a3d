-- MIMIC-IV core: hosp/patients and hosp/admissions.
-- Inputs: raw_patients, raw_admissions (all VARCHAR, with _line). Outputs: v_patients, mimic_subjects,
-- v_admissions, e_patients, e_admissions.

-- patients: the first row of a subject_id wins; later duplicates are quarantined.
CREATE OR REPLACE TEMP TABLE v_patients AS
WITH t AS (
    SELECT _line, subject_id AS sid_raw, fs_id(subject_id) AS subject_id, upper(trim(gender)) AS gender,
           anchor_age AS age_raw, fs_id(anchor_age) AS anchor_age,
           anchor_year AS year_raw, fs_id(anchor_year) AS anchor_year,
           dod AS dod_raw, fs_ts(dod) AS dod,
           min(_line) OVER (PARTITION BY fs_id(subject_id)) AS first_line
    FROM raw_patients
)
SELECT *,
    coalesce(
        fs_check_id('subject_id', sid_raw, true),
        CASE WHEN _line <> first_line THEN 'duplicate subject_id (line ' || first_line || ' kept): ' || sid_raw END,
        CASE WHEN gender IS NULL THEN 'missing gender' END,
        fs_check_id('anchor_age', age_raw, true),
        CASE WHEN anchor_age NOT BETWEEN 0 AND 120 THEN 'absurd anchor_age: ' || age_raw END,
        fs_check_id('anchor_year', year_raw, true),
        fs_check_time('dod', dod_raw, false),
        CASE WHEN year(dod) < anchor_year - anchor_age - 1 THEN 'dod before birth: ' || dod_raw END
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

-- One row per valid subject. MIMIC gives the age in the anchor year, so birth is 1 Jan of
-- anchor_year - anchor_age (to within a year); ages of 89+ are top-coded, so no birth bound is checked there.
CREATE OR REPLACE TEMP TABLE mimic_subjects AS
SELECT subject_id,
       make_timestamp(anchor_year - anchor_age, 1, 1, 0, 0, 0) AS birth,
       CASE WHEN anchor_age < 89 THEN make_timestamp(anchor_year - anchor_age - 1, 1, 1, 0, 0, 0) END AS birth_floor,
       dod
FROM v_patients WHERE _quarantine IS NULL;

-- admissions
CREATE OR REPLACE TEMP TABLE v_admissions AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id AS hadm_raw, fs_id(r.hadm_id) AS hadm_id,
           min(r._line) OVER (PARTITION BY fs_id(r.hadm_id)) AS first_line,
           r.admittime AS admit_raw, fs_ts(r.admittime) AS admittime,
           r.dischtime AS disch_raw, fs_ts(r.dischtime) AS dischtime,
           r.deathtime AS death_raw, fs_ts(r.deathtime) AS deathtime,
           r.edregtime AS edreg_raw, fs_ts(r.edregtime) AS edregtime,
           r.edouttime AS edout_raw, fs_ts(r.edouttime) AS edouttime,
           r.admission_type, r.admission_location, r.discharge_location, r.insurance, r.language,
           r.marital_status, r.race
    FROM raw_admissions r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        fs_check_subject(sid_raw, known),
        fs_check_id('hadm_id', hadm_raw, true),
        CASE WHEN _line <> first_line THEN 'duplicate hadm_id (line ' || first_line || ' kept): ' || hadm_raw END,
        CASE WHEN admission_type IS NULL THEN 'missing admission_type' END,
        fs_check_time('admittime', admit_raw, true),
        fs_check_time('dischtime', disch_raw, true),
        fs_check_time('deathtime', death_raw, false),
        fs_check_time('edregtime', edreg_raw, false),
        fs_check_time('edouttime', edout_raw, false),
        fs_check_order('admittime', admittime, 'dischtime', dischtime),
        fs_check_birth(least(admittime, edregtime), birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

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
