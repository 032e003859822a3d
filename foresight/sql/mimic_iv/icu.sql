-- MIMIC-IV ICU module: icustays, inputevents, outputevents, procedureevents, datetimeevents, chartevents.
-- Item ids are kept as MIMIC codes (<KIND>//MIMIC//<itemid>); icu/d_items supplies descriptions.

-- icustays -> ICU//ADMIT at intime (first care unit in text_value), ICU//DISCHARGE at outtime (los days).
-- sliced by line: raw_icustays
CREATE OR REPLACE TABLE fs_stage.v_icustays AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.stay_id, r.first_careunit, r.last_careunit, r.los AS los_raw,
           r.intime AS in_raw, fs_ts(r.intime) AS intime, r.outtime AS out_raw, fs_ts(r.outtime) AS outtime
    FROM raw_icustays r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_local_time('intime', in_raw, true),
        fs_check_local_time('outtime', out_raw, false),
        fs_check_order('intime', intime, 'outtime', outtime),
        fs_check_num('los', los_raw, true),
        fs_check_birth(intime, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_icustays AS
SELECT _line, subject_id, intime AS time, 'ICU//ADMIT' AS code, NULL::FLOAT AS numeric_value,
       first_careunit AS text_value, NULL AS unit, hadm_id AS encounter_id
FROM v_icustays WHERE _quarantine IS NULL
UNION ALL
SELECT _line, subject_id, outtime, 'ICU//DISCHARGE', fs_num(los_raw)::FLOAT, last_careunit, 'day', hadm_id
FROM v_icustays WHERE _quarantine IS NULL AND outtime IS NOT NULL;

-- inputevents -> INPUT_START//MIMIC//<itemid> (rate, or the amount for a bolus) at starttime,
-- INPUT_END//MIMIC//<itemid> (amount given) at endtime, and the patient weight once per stay and value
-- (VITAL//ICU//WEIGHT_KG) rather than repeated on every infusion row.
-- sliced by line: raw_inputevents
CREATE OR REPLACE TABLE fs_stage.v_inputevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.stay_id, r.itemid AS item_raw, fs_id(r.itemid) AS itemid,
           r.amount AS amount_raw, r.amountuom, r.rate AS rate_raw, r.rateuom, r.patientweight AS weight_raw,
           r.starttime AS start_raw, fs_ts(r.starttime) AS starttime,
           r.endtime AS end_raw, fs_ts(r.endtime) AS endtime
    FROM raw_inputevents r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('itemid', item_raw, true),
        fs_check_local_time('starttime', start_raw, true),
        fs_check_local_time('endtime', end_raw, false),
        fs_check_order('starttime', starttime, 'endtime', endtime),
        fs_check_num('amount', amount_raw, true),
        fs_check_num('rate', rate_raw, true),
        fs_check_num('patientweight', weight_raw, true),
        fs_check_birth(starttime, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_inputevents AS
WITH ok AS (SELECT * FROM v_inputevents WHERE _quarantine IS NULL)
SELECT _line, subject_id, starttime AS time, 'INPUT_START//MIMIC//' || itemid AS code,
       coalesce(fs_num(rate_raw), fs_num(amount_raw))::FLOAT AS numeric_value, NULL AS text_value,
       CASE WHEN rate_raw IS NOT NULL THEN rateuom ELSE amountuom END AS unit, hadm_id AS encounter_id
FROM ok
UNION ALL
SELECT _line, subject_id, endtime, 'INPUT_END//MIMIC//' || itemid, fs_num(amount_raw)::FLOAT, NULL, amountuom,
       hadm_id
FROM ok WHERE endtime IS NOT NULL
UNION ALL
SELECT _line, subject_id, starttime, 'VITAL//ICU//WEIGHT_KG', fs_num(weight_raw)::FLOAT, NULL, 'kg', hadm_id
FROM (SELECT *, row_number() OVER (PARTITION BY stay_id, fs_num(weight_raw) ORDER BY starttime, _line) AS k
      FROM ok WHERE fs_num(weight_raw) > 0)
WHERE k = 1;

-- outputevents -> OUTPUT//MIMIC//<itemid> (volume) at charttime.
-- sliced by line: raw_outputevents
CREATE OR REPLACE TABLE fs_stage.v_outputevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.itemid AS item_raw, fs_id(r.itemid) AS itemid, r.value AS value_raw,
           r.valueuom, r.charttime AS chart_raw, fs_ts(r.charttime) AS time
    FROM raw_outputevents r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('itemid', item_raw, true),
        fs_check_local_time('charttime', chart_raw, true),
        fs_check_num('value', value_raw, true),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_outputevents AS
SELECT _line, subject_id, time, 'OUTPUT//MIMIC//' || itemid AS code, fs_num(value_raw)::FLOAT AS numeric_value,
       NULL AS text_value, valueuom AS unit, hadm_id AS encounter_id
FROM v_outputevents WHERE _quarantine IS NULL;

-- procedureevents -> PX//MIMIC//<itemid> at starttime (value, e.g. duration, in numeric_value),
-- PX_END//MIMIC//<itemid> at endtime.
-- sliced by line: raw_procedureevents
CREATE OR REPLACE TABLE fs_stage.v_procedureevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.itemid AS item_raw, fs_id(r.itemid) AS itemid, r.value AS value_raw,
           r.valueuom, r.starttime AS start_raw, fs_ts(r.starttime) AS starttime,
           r.endtime AS end_raw, fs_ts(r.endtime) AS endtime
    FROM raw_procedureevents r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('itemid', item_raw, true),
        fs_check_local_time('starttime', start_raw, true),
        fs_check_local_time('endtime', end_raw, false),
        fs_check_order('starttime', starttime, 'endtime', endtime),
        fs_check_num('value', value_raw, true),
        fs_check_birth(starttime, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_procedureevents AS
SELECT _line, subject_id, starttime AS time, 'PX//MIMIC//' || itemid AS code,
       fs_num(value_raw)::FLOAT AS numeric_value, NULL AS text_value, valueuom AS unit, hadm_id AS encounter_id
FROM v_procedureevents WHERE _quarantine IS NULL
UNION ALL
SELECT _line, subject_id, endtime, 'PX_END//MIMIC//' || itemid, NULL, NULL, NULL, hadm_id
FROM v_procedureevents WHERE _quarantine IS NULL AND endtime IS NOT NULL;

-- datetimeevents -> DATETIME//MIMIC//<itemid> when it was recorded (storetime, else charttime); the date
-- value itself (e.g. a line insertion date) in text_value.
-- sliced by line: raw_datetimeevents
CREATE OR REPLACE TABLE fs_stage.v_datetimeevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.itemid AS item_raw, fs_id(r.itemid) AS itemid, r.value AS value_raw,
           r.charttime AS chart_raw, r.storetime AS store_raw,
           coalesce(fs_ts(r.storetime), fs_ts(r.charttime)) AS time
    FROM raw_datetimeevents r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('itemid', item_raw, true),
        fs_check_local_time('charttime', chart_raw, true),
        fs_check_local_time('storetime', store_raw, false),
        fs_check_local_time('value', value_raw, false),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_datetimeevents AS
SELECT _line, subject_id, time, 'DATETIME//MIMIC//' || itemid AS code, NULL::FLOAT AS numeric_value,
       value_raw AS text_value, NULL AS unit, hadm_id AS encounter_id
FROM v_datetimeevents WHERE _quarantine IS NULL;

-- chartevents (absent from the demo copy; loaded when present) -> CHART//MIMIC//<itemid> when stored.
-- sliced by line: raw_chartevents
CREATE OR REPLACE TABLE fs_stage.v_chartevents AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.itemid AS item_raw, fs_id(r.itemid) AS itemid, r.value,
           r.valuenum AS num_raw, r.valueuom, r.charttime AS chart_raw, r.storetime AS store_raw,
           coalesce(fs_ts(r.storetime), fs_ts(r.charttime)) AS time
    FROM raw_chartevents r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('itemid', item_raw, true),
        fs_check_local_time('charttime', chart_raw, true),
        fs_check_local_time('storetime', store_raw, false),
        fs_check_num('valuenum', num_raw, false),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    NULL::VARCHAR AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_chartevents AS
SELECT _line, subject_id, time, 'CHART//MIMIC//' || itemid AS code, fs_num(num_raw)::FLOAT AS numeric_value,
       CASE WHEN num_raw IS NULL THEN value END AS text_value, valueuom AS unit, hadm_id AS encounter_id
FROM v_chartevents WHERE _quarantine IS NULL;
