-- MIMIC-IV medications: hosp/prescriptions (the orders), hosp/pharmacy (only orders prescriptions lacks) and
-- hosp/emar (administrations). Drugs are coded by name (RX_*//DRUG//<name>): MIMIC has no RxNorm, NDCs are
-- package-level and often missing, and names are what drug->ATC maps (e.g. ETHOS's) are keyed on.

-- prescriptions -> RX_START at starttime (dose in numeric_value/unit, route in text_value), RX_STOP at stoptime.
-- sliced by line: raw_prescriptions
CREATE OR REPLACE TABLE fs_stage.v_prescriptions AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, fs_id(r.pharmacy_id) AS pharmacy_id, r.drug, r.route,
           r.dose_val_rx, r.dose_unit_rx,
           r.starttime AS start_raw, fs_ts(r.starttime) AS starttime,
           r.stoptime AS stop_raw, fs_ts(r.stoptime) AS stoptime
    FROM raw_prescriptions r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        CASE WHEN drug IS NULL THEN 'missing drug' END,
        fs_check_local_time('starttime', start_raw, false),
        fs_check_local_time('stoptime', stop_raw, false),
        fs_check_birth(starttime, birth_floor)
    ) AS _quarantine,
    CASE WHEN starttime IS NULL AND stoptime IS NULL THEN 'no starttime or stoptime' END AS _drop
FROM t;

-- A stop before its start (a discontinued order, ~4% of MIMIC orders) keeps the start and emits no stop.
CREATE OR REPLACE TEMP VIEW e_prescriptions AS
SELECT _line, subject_id, starttime AS time, 'RX_START//DRUG//' || fs_part(drug) AS code,
       fs_num(dose_val_rx)::FLOAT AS numeric_value, route AS text_value, dose_unit_rx AS unit,
       hadm_id AS encounter_id
FROM v_prescriptions WHERE _quarantine IS NULL AND starttime IS NOT NULL
UNION ALL
SELECT _line, subject_id, stoptime, 'RX_STOP//DRUG//' || fs_part(drug), NULL, route, NULL, hadm_id
FROM v_prescriptions
WHERE _quarantine IS NULL AND stoptime IS NOT NULL AND (starttime IS NULL OR stoptime >= starttime);

-- pharmacy: the same orders as prescriptions, verified; only rows without a prescriptions row add events.
-- sliced by line: raw_pharmacy
CREATE OR REPLACE TABLE fs_stage.v_pharmacy AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.pharmacy_id AS pharmacy_raw, r.medication, r.route,
           r.starttime AS start_raw, fs_ts(r.starttime) AS starttime,
           r.stoptime AS stop_raw, fs_ts(r.stoptime) AS stoptime,
           EXISTS (SELECT 1 FROM v_prescriptions p
                   WHERE p.pharmacy_id = fs_id(r.pharmacy_id) AND p._quarantine IS NULL) AS in_prescriptions
    FROM raw_pharmacy r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_id('pharmacy_id', pharmacy_raw, true),
        fs_check_local_time('starttime', start_raw, false),
        fs_check_local_time('stoptime', stop_raw, false),
        fs_check_birth(starttime, birth_floor)
    ) AS _quarantine,
    CASE WHEN in_prescriptions THEN 'order already loaded from prescriptions (same pharmacy_id)'
         WHEN starttime IS NULL AND stoptime IS NULL THEN 'no starttime or stoptime' END AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_pharmacy AS
SELECT _line, subject_id, starttime AS time, 'RX_START//DRUG//' || fs_part(medication) AS code,
       NULL::FLOAT AS numeric_value, route AS text_value, NULL AS unit, hadm_id AS encounter_id
FROM v_pharmacy WHERE _quarantine IS NULL AND NOT in_prescriptions AND starttime IS NOT NULL
UNION ALL
SELECT _line, subject_id, stoptime, 'RX_STOP//DRUG//' || fs_part(medication), NULL, route, NULL, hadm_id
FROM v_pharmacy
WHERE _quarantine IS NULL AND NOT in_prescriptions AND stoptime IS NOT NULL
  AND (starttime IS NULL OR stoptime >= starttime);

-- emar -> RX_ADMIN//DRUG//<medication> at charttime, only for rows that record a dose actually given
-- (Administered, Applied, Started, Restarted, with their Delayed/Partial forms); the rest (Not Given,
-- Flushed, Hold Dose, Stopped, ...) are dropped with the event text as the reason.
-- sliced by line: raw_emar
CREATE OR REPLACE TABLE fs_stage.v_emar AS
WITH t AS (
    SELECT r._line, r.subject_id AS sid_raw, fs_id(r.subject_id) AS subject_id, s.subject_id AS known,
           s.birth_floor, r.hadm_id, r.medication, trim(r.event_txt) AS event_txt,
           r.charttime AS chart_raw, fs_ts(r.charttime) AS charttime,
           regexp_matches(coalesce(trim(r.event_txt), ''),
                          '^(Delayed |Partial )?(Administered|Applied|Started|Restarted)') AS given
    FROM raw_emar r LEFT JOIN mimic_subjects s ON s.subject_id = fs_id(r.subject_id)
)
SELECT *,
    coalesce(
        mimic_check_subject(sid_raw, known),
        fs_check_local_time('charttime', chart_raw, true),
        fs_check_birth(charttime, birth_floor)
    ) AS _quarantine,
    CASE WHEN NOT given THEN 'not an administration: ' || coalesce(event_txt, '(empty event_txt)') END AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_emar AS
SELECT _line, subject_id, charttime AS time, 'RX_ADMIN//DRUG//' || fs_part(medication) AS code,
       NULL::FLOAT AS numeric_value, event_txt AS text_value, NULL AS unit, hadm_id AS encounter_id
FROM v_emar WHERE _quarantine IS NULL AND given;
