-- MIMIC-IV results: hosp/labevents, hosp/microbiologyevents, hosp/omr.

-- labevents -> LAB//MIMIC//<itemid>, timed when the result was stored (known to clinicians), falling back to
-- the draw time when storetime is missing. numeric_value = valuenum; text_value = value when not numeric.
-- Optional fields (see core.sql): a storetime that fails its check is set to NULL (the draw time is used) and a
-- valuenum that is not a number is set to NULL (the row keeps its text value); both are reported in _field_issue.
-- A number that is absurd (non-finite, beyond 1e9) is a corrupt measurement and quarantines the row.
-- sliced by line: raw_labevents
CREATE OR REPLACE TABLE fs_stage.v_labevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.itemid AS item_raw, fs_id(r.itemid) AS itemid,
           r.charttime AS chart_raw, r.storetime AS store_raw,
           fs_check_local_time('storetime', r.storetime, false) AS store_issue,
           CASE WHEN r.valuenum IS NOT NULL AND fs_num(r.valuenum) IS NULL
                THEN 'non-numeric valuenum: ' || r.valuenum END AS num_issue,
           r.value, r.valuenum AS valuenum_raw, r.valueuom
    FROM raw_labevents r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
), c AS (
    SELECT * EXCLUDE (store_issue, num_issue),
        coalesce(CASE WHEN store_issue IS NULL THEN fs_ts(store_raw) END, fs_ts(chart_raw)) AS time,
        CASE WHEN num_issue IS NULL THEN valuenum_raw END AS num_raw,
        nullif(concat_ws('; ', store_issue, num_issue), '') AS _field_issue
    FROM t
)
SELECT * EXCLUDE (_field_issue),
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('itemid', item_raw, true),
        fs_check_local_time('charttime', chart_raw, true),
        fs_check_num('valuenum', num_raw, false),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop,
    _field_issue
FROM c;

CREATE OR REPLACE TEMP VIEW e_labevents AS
SELECT _line, subject_id, time, 'LAB//MIMIC//' || itemid AS code, fs_num(num_raw)::FLOAT AS numeric_value,
       CASE WHEN num_raw IS NULL THEN value END AS text_value, valueuom AS unit, hadm_id AS encounter_id
FROM v_labevents WHERE _quarantine IS NULL;

-- microbiologyevents: one event per row, timed when the result was stored.
--   organism + antibiotic -> MICRO//SUSC//<ab_itemid> (interpretation S/I/R in text_value, dilution numeric)
--   organism only         -> MICRO//ORG//<org_itemid> (organism name in text_value)
--   no organism           -> MICRO//TEST//<test_itemid> (comments, e.g. "No growth", in text_value)
-- sliced by line: raw_microbiologyevents
CREATE OR REPLACE TABLE fs_stage.v_microbiologyevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.test_itemid, r.org_itemid, r.ab_itemid, r.org_name, r.interpretation,
           r.comments, r.test_name, r.ab_name, r.dilution_value AS dilution_raw,
           r.chartdate AS chartdate_raw, r.charttime AS chart_raw, r.storedate AS storedate_raw,
           r.storetime AS store_raw,
           coalesce(fs_ts(r.storetime), fs_ts(r.storedate), fs_ts(r.charttime), fs_ts(r.chartdate)) AS time
    FROM raw_microbiologyevents r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_local_time('chartdate', chartdate_raw, false),
        fs_check_local_time('charttime', chart_raw, false),
        fs_check_local_time('storedate', storedate_raw, false),
        fs_check_local_time('storetime', store_raw, false),
        CASE WHEN time IS NULL THEN 'no chart or store time' END,
        fs_check_id('test_itemid', test_itemid, true),
        fs_check_id('org_itemid', org_itemid, false),
        fs_check_id('ab_itemid', ab_itemid, false),
        fs_check_num('dilution_value', dilution_raw, true),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_microbiologyevents AS
SELECT _line, subject_id, time,
       CASE WHEN org_itemid IS NOT NULL AND ab_itemid IS NOT NULL THEN 'MICRO//SUSC//' || fs_id(ab_itemid)
            WHEN org_itemid IS NOT NULL THEN 'MICRO//ORG//' || fs_id(org_itemid)
            ELSE 'MICRO//TEST//' || fs_id(test_itemid) END AS code,
       CASE WHEN ab_itemid IS NOT NULL THEN fs_num(dilution_raw) END::FLOAT AS numeric_value,
       CASE WHEN org_itemid IS NOT NULL AND ab_itemid IS NOT NULL THEN interpretation
            WHEN org_itemid IS NOT NULL THEN org_name
            ELSE trim(comments) END AS text_value,
       NULL AS unit, hadm_id AS encounter_id
FROM v_microbiologyevents WHERE _quarantine IS NULL;

-- omr (outpatient measurements) -> VITAL//OMR//<result_name> on chartdate; numeric when the value is a
-- number (weight, height, BMI), text always (blood pressure "120/80" stays text).
-- sliced by line: raw_omr
CREATE OR REPLACE TABLE fs_stage.v_omr AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.result_name, r.result_value, r.chartdate AS chartdate_raw,
           fs_ts(r.chartdate) AS time
    FROM raw_omr r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_local_time('chartdate', chartdate_raw, true),
        CASE WHEN result_name IS NULL THEN 'missing result_name' END,
        CASE WHEN fs_num(result_value) IS NOT NULL THEN fs_check_num('result_value', result_value, true) END,
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    CASE WHEN result_value IS NULL THEN 'empty result_value' END AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_omr AS
SELECT _line, subject_id, time, 'VITAL//OMR//' || fs_part(result_name) AS code,
       fs_num(result_value)::FLOAT AS numeric_value, result_value AS text_value, NULL AS unit,
       NULL AS encounter_id
FROM v_omr WHERE _quarantine IS NULL AND result_value IS NOT NULL;
