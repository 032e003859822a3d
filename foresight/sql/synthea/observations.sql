-- Synthea CSV observations.csv -> VITAL//LOINC//<code> (CATEGORY vital-signs: height, weight, blood pressure...)
-- or LAB//LOINC//<code> (laboratory, survey, exam, ...) at DATE. A numeric observation (TYPE numeric, or no TYPE
-- and a number) has its value in numeric_value and UNITS in unit; a categorical one ("Never smoker") in text_value.
-- Synthea's QALY/DALY/QOLS rows are the simulator's own yearly summary metrics, not clinical observations, and no
-- FHIR export carries them: dropped with that reason.

-- sliced by line: raw_observations
CREATE OR REPLACE TABLE fs_stage.v_observations AS
WITH t AS (
    SELECT r._line, r.PATIENT AS pat_raw, s.subject_id, s.birth_floor, trim(r.ENCOUNTER) AS enc_raw,
           e.subject_id AS enc_subject, r.DATE AS date_raw, ehr_known(r.DATE) AS time,
           nullif(trim(r.CODE), '') AS code_raw, lower(trim(r.CATEGORY)) AS category, r.VALUE AS value,
           nullif(trim(r.UNITS), '') AS units, lower(trim(r.TYPE)) AS type, r.DESCRIPTION AS description,
           coalesce(lower(trim(r.TYPE)) = 'numeric', lower(trim(r.TYPE)) IS NULL AND fs_num(r.VALUE) IS NOT NULL)
               AS is_numeric
    FROM raw_observations r
    LEFT JOIN synthea_subjects s ON s.pid = lower(trim(r.PATIENT))
    LEFT JOIN synthea_encounters e ON e.eid = lower(trim(r.ENCOUNTER))
)
SELECT *,
    coalesce(
        synthea_check_patient('PATIENT', pat_raw, subject_id),
        ehr_check_encounter('ENCOUNTER', enc_raw, enc_subject, subject_id),
        CASE WHEN code_raw IS NULL THEN 'missing CODE' END,
        fs_check_time('DATE', date_raw, true),
        CASE WHEN is_numeric THEN fs_check_num('VALUE', value, false) END,
        ehr_check_future('DATE', date_raw),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    CASE WHEN code_raw IN ('QALY', 'DALY', 'QOLS') AND category IS NULL
         THEN 'Synthea simulator summary metric (QALY/DALY/QOLS), not a clinical observation' END AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_observations AS
SELECT _line, subject_id, time,
       CASE WHEN category = 'vital-signs' THEN 'VITAL' ELSE 'LAB' END || '//LOINC//' || fs_part(code_raw) AS code,
       CASE WHEN is_numeric THEN fs_num(value) END::FLOAT AS numeric_value,
       CASE WHEN NOT is_numeric THEN nullif(trim(value), '') END AS text_value,
       CASE WHEN is_numeric THEN units END AS unit, enc_raw AS encounter_id
FROM v_observations WHERE _quarantine IS NULL AND _drop IS NULL;
