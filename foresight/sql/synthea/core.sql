-- Synthea CSV core: patients.csv and encounters.csv (macros: foresight/sql/common/ehr_macros.sql).
-- Inputs: raw_patients, raw_encounters (all VARCHAR, with _line); fs_load(source). Outputs: v_patients,
-- synthea_subjects, v_encounters, synthea_encounters, e_patients, e_encounters.
-- Patient ids are UUIDs: subject ids come from subject_map when this source already mapped the patient, else
-- from the stable hash fs_uuid_subject (the same rule the FHIR source uses, so both copies of an export agree).

-- patients: the first row of an Id wins; later duplicates are quarantined. Id and BIRTHDATE are required; a
-- DEATHDATE that fails its check (unparseable, implausible, in the future, before birth) is set to NULL and the
-- patient kept, so one bad optional date does not remove them and all their rows. The row counts as loaded (the
-- invariant read = loaded + quarantined + dropped counts rows); _field_issue names the field and the load reports
-- it in warnings (Load.finish_table).
CREATE OR REPLACE TABLE fs_stage.v_patients AS
WITH t AS (
    SELECT _line, Id AS id_raw, lower(trim(Id)) AS pid,
           BIRTHDATE AS birth_raw, fs_ts(BIRTHDATE) AS birth, DEATHDATE AS death_raw,
           nullif(trim(GENDER), '') AS gender, nullif(trim(RACE), '') AS race,
           nullif(trim(ETHNICITY), '') AS ethnicity,
           min(_line) OVER (PARTITION BY lower(trim(Id))) AS first_line
    FROM raw_patients
), c AS (
    SELECT *,
        coalesce(
            fs_check_time('DEATHDATE', death_raw, false),
            ehr_check_future('DEATHDATE', death_raw),
            CASE WHEN fs_ts_utc(death_raw) < ehr_birth_floor(birth)
                 THEN 'DEATHDATE before BIRTHDATE: ' || death_raw END
        ) AS death_issue
    FROM t
)
SELECT * EXCLUDE (death_issue),
    CASE WHEN death_issue IS NULL THEN ehr_known(death_raw) END AS death,
    coalesce(
        CASE WHEN pid IS NULL OR pid = '' THEN 'missing Id' END,
        CASE WHEN _line <> first_line THEN 'duplicate patient Id (line ' || first_line || ' kept): ' || id_raw END,
        fs_check_time('BIRTHDATE', birth_raw, true),
        CASE WHEN NOT ehr_is_date(birth_raw) THEN 'BIRTHDATE is not a date (YYYY-MM-DD): ' || birth_raw END,
        ehr_check_future('BIRTHDATE', birth_raw)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop,
    death_issue AS _field_issue
FROM c;

CREATE OR REPLACE TEMP TABLE synthea_subjects AS
SELECT p.pid, coalesce(m.subject_id, fs_uuid_subject(p.pid)) AS subject_id, p.birth,
       ehr_birth_floor(p.birth) AS birth_floor, p.death
FROM v_patients p
LEFT JOIN subject_map m ON m.source = (SELECT source FROM fs_load) AND m.source_id = p.pid
WHERE p._quarantine IS NULL;

-- Patients whose row was quarantined and who have no valid row: their rows in other tables say so rather than
-- "unknown patient" (synthea_check_patient, used by every later table).
CREATE OR REPLACE TEMP TABLE synthea_patient_problems AS
SELECT pid, min(_line) AS line, arg_min(_quarantine, _line) AS reason
FROM v_patients
WHERE _quarantine IS NOT NULL AND pid <> '' AND pid NOT IN (SELECT pid FROM synthea_subjects)
GROUP BY pid;

CREATE OR REPLACE TEMP MACRO synthea_check_patient(col, raw, known) AS
    coalesce(
        CASE WHEN known IS NULL THEN
            (SELECT col || ' ' || trim(raw) || ': its patients row was quarantined (line ' || q.line || ': '
                    || q.reason || ')'
             FROM synthea_patient_problems q WHERE q.pid = lower(trim(raw))) END,
        ehr_check_patient(col, raw, known));

-- encounters: the first row of an Id wins.
CREATE OR REPLACE TABLE fs_stage.v_encounters AS
WITH t AS (
    SELECT r._line, trim(r.Id) AS id_raw, lower(trim(r.Id)) AS eid, r.PATIENT AS pat_raw, s.subject_id,
           s.birth_floor, r.START AS start_raw, fs_ts_utc(r.START) AS start, r.STOP AS stop_raw,
           ehr_known(r.STOP) AS stop, r.ENCOUNTERCLASS AS class_raw, ehr_encounter_class(r.ENCOUNTERCLASS) AS cls,
           r.DESCRIPTION AS description,
           min(r._line) OVER (PARTITION BY lower(trim(r.Id))) AS first_line
    FROM raw_encounters r LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
)
SELECT *,
    coalesce(
        CASE WHEN eid IS NULL OR eid = '' THEN 'missing Id' END,
        CASE WHEN _line <> first_line THEN 'duplicate encounter Id (line ' || first_line || ' kept): ' || id_raw END,
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        CASE WHEN nullif(trim(class_raw), '') IS NULL THEN 'missing ENCOUNTERCLASS' END,
        fs_check_time('START', start_raw, true),
        fs_check_time('STOP', stop_raw, false),
        fs_check_order('START', start, 'STOP', stop),
        ehr_check_future('START', start_raw),
        ehr_check_future('STOP', stop_raw),
        fs_check_birth(start, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

-- The valid encounters: the timing anchor of what other tables record in them.
CREATE OR REPLACE TEMP TABLE synthea_encounters AS
SELECT eid, subject_id, start, stop, cls FROM v_encounters WHERE _quarantine IS NULL;

-- Hospital-type classes: ADMIT//<class> at START, DISCHARGE//<class> at STOP (Synthea records no discharge
-- disposition). Other classes: ENCOUNTER//<class> at START. The encounter type (DESCRIPTION) goes to text_value.
CREATE OR REPLACE TEMP VIEW e_encounters AS
WITH e AS (SELECT * FROM v_encounters WHERE _quarantine IS NULL)
SELECT _line, subject_id, start AS time,
       CASE WHEN ehr_is_hospital(cls) THEN 'ADMIT//' ELSE 'ENCOUNTER//' END || cls AS code,
       NULL::FLOAT AS numeric_value, description AS text_value, NULL AS unit, id_raw AS encounter_id
FROM e
UNION ALL
SELECT _line, subject_id, stop, 'DISCHARGE//' || cls, NULL, description, NULL, id_raw
FROM e WHERE ehr_is_hospital(cls) AND stop IS NOT NULL;

-- Static facts (GENDER, RACE, ETHNICITY) have no time; MEDS_BIRTH at the birth date's midnight; MEDS_DEATH at
-- DEATHDATE (a date only: known by the end of that day, ehr_known, so the events of the day of death precede it).
CREATE OR REPLACE TEMP VIEW e_patients AS
WITH p AS (SELECT v.*, s.subject_id FROM v_patients v JOIN synthea_subjects s USING (pid) WHERE v._quarantine IS NULL)
SELECT _line, subject_id, NULL::TIMESTAMP AS time, 'GENDER//' || fs_part(gender) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, NULL AS encounter_id
FROM p WHERE gender IS NOT NULL
UNION ALL
SELECT _line, subject_id, NULL, 'RACE//' || fs_part(race), NULL, NULL, NULL, NULL FROM p WHERE race IS NOT NULL
UNION ALL
SELECT _line, subject_id, NULL, 'ETHNICITY//' || fs_part(ethnicity), NULL, NULL, NULL, NULL
FROM p WHERE ethnicity IS NOT NULL
UNION ALL
SELECT _line, subject_id, birth, 'MEDS_BIRTH', NULL, NULL, NULL, NULL FROM p
UNION ALL
SELECT _line, subject_id, death, 'MEDS_DEATH', NULL, NULL, NULL, NULL FROM p WHERE death IS NOT NULL;
