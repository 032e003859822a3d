-- FHIR Observation -> VITAL//<vocab>//<code> (category vital-signs) or LAB//<vocab>//<code> (laboratory,
-- survey, exam, ...), like the Synthea CSV source. One event for the observation's own value[x] (or for the code
-- alone when it has neither a value nor components) and one per component (a blood pressure's systolic and
-- diastolic; a survey's answers), each with its own code and value: the Synthea CSV writes exactly those rows.
-- Time: when the result was issued (known to clinicians), never before its effective time.

CREATE OR REPLACE TABLE fs_stage.v_observation AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best(j.code) AS c,
           CASE WHEN list_contains(flatten(list_transform(coalesce(j.category, []),
                                                          lambda x: list_transform(coalesce(x.coding, []),
                                                                                   lambda y: y.code))),
                                   'vital-signs')
                THEN 'VITAL' ELSE 'LAB' END AS kind,
           coalesce(j.effectiveDateTime, j.effectivePeriod.start, j.effectiveInstant) AS effective_raw,
           j.issued AS issued_raw, fhir_value_of(j) AS val,
           list_transform(coalesce(j.component, []),
                          lambda x: {'c': fhir_best(json_extract(x, 'code')), 'val': fhir_value(x)}) AS comps
    FROM (SELECT *, json_transform(resource, '{"code": "JSON", "category": [{"coding": [{"code": "VARCHAR"}]}],
              "effectiveDateTime": "VARCHAR", "effectivePeriod": {"start": "VARCHAR"},
              "effectiveInstant": "VARCHAR", "issued": "VARCHAR", "component": ["JSON"],
              "valueQuantity": {"value": "VARCHAR", "unit": "VARCHAR", "code": "VARCHAR"}, "valueInteger": "VARCHAR",
              "valueCodeableConcept": "JSON", "valueString": "VARCHAR", "valueBoolean": "VARCHAR",
              "valueDateTime": "VARCHAR"}') AS j
          FROM fhir_rows('raw_observation')) f
)
SELECT *, greatest(ehr_known(effective_raw), ehr_ts(issued_raw)) AS time,
    coalesce(
        fhir_check_common('Observation', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL THEN 'Observation without a code' END,
        CASE WHEN len(list_filter(comps, lambda x: x.c IS NULL)) > 0 THEN 'Observation component without a code' END,
        fs_check_time('effectiveDateTime', effective_raw, false),
        fs_check_time('issued', issued_raw, false),
        CASE WHEN effective_raw IS NULL AND issued_raw IS NULL THEN 'no effective or issued time' END,
        fs_check_num('valueQuantity.value', val.num_raw, false),
        list_filter(list_transform(comps, lambda x: fs_check_num('component valueQuantity.value', x.val.num_raw,
                                                                 false)),
                    lambda r: r IS NOT NULL)[1],
        ehr_check_future('effectiveDateTime', effective_raw),
        ehr_check_future('issued', issued_raw),
        fs_check_birth(ehr_ts(coalesce(effective_raw, issued_raw)), birth_floor)
    ) AS _quarantine,
    fhir_drop_status(status) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_observation AS
WITH o AS (SELECT * FROM v_observation WHERE _quarantine IS NULL AND _drop IS NULL)
SELECT _line, subject_id, time, kind || '//' || c.vocab || '//' || fs_part(c.code) AS code,
       val.num::FLOAT AS numeric_value, CASE WHEN val.num_raw IS NULL THEN val.text END AS text_value,
       CASE WHEN val.num_raw IS NOT NULL THEN val.unit END AS unit, enc_id AS encounter_id
FROM o WHERE val.has OR len(comps) = 0
UNION ALL
SELECT _line, subject_id, time, kind || '//' || x.c.vocab || '//' || fs_part(x.c.code), x.val.num::FLOAT,
       CASE WHEN x.val.num_raw IS NULL THEN x.val.text END, CASE WHEN x.val.num_raw IS NOT NULL THEN x.val.unit END,
       enc_id
FROM (SELECT *, unnest(comps) AS x FROM o);
