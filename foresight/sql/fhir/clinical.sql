-- FHIR clinical resources: Condition, MedicationRequest, Procedure, Immunization, AllergyIntolerance, CarePlan,
-- ImagingStudy, DiagnosticReport. Inputs: raw_<table>, fhir_subjects, fhir_encounters, fhir_medications.
-- Codes and times follow the Synthea CSV source (foresight/sql/synthea/clinical.sql) so both exports of one
-- population agree; the vocabulary comes from each coding's system. Every row: a duplicate id, a missing or
-- unknown patient, another patient's encounter -> quarantined (fhir_check_common); a status saying it did not
-- happen -> dropped (fhir_drop_status).

-- Condition -> DX//<vocab>//<code>, known when recorded (recordedDate, else onset) but not before the end of the
-- encounter that recorded it (inpatient: discharge); DX_END at abatement, never before the DX itself.
CREATE OR REPLACE TABLE fs_stage.v_condition AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best(j.code) AS c,
           coalesce(j.onsetDateTime, j.onsetPeriod.start) AS onset_raw, j.recordedDate AS recorded_raw,
           coalesce(j.abatementDateTime, j.abatementPeriod.start) AS abate_raw,
           j.verificationStatus.coding[1].code AS verification
    FROM (SELECT *, json_transform(resource, '{"code": "JSON", "onsetDateTime": "VARCHAR",
              "onsetPeriod": {"start": "VARCHAR"}, "recordedDate": "VARCHAR", "abatementDateTime": "VARCHAR",
              "abatementPeriod": {"start": "VARCHAR"}, "verificationStatus": {"coding": [{"code": "VARCHAR"}]}}') AS j
          FROM fhir_rows('raw_condition')) f
), k AS (
    SELECT *, ehr_known_after(enc_end, coalesce(recorded_raw, onset_raw)) AS time FROM t
)
SELECT *,
    coalesce(
        fhir_check_common('Condition', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL THEN 'Condition without a code' END,
        fs_check_time('onsetDateTime', onset_raw, false),
        fs_check_time('recordedDate', recorded_raw, false),
        fs_check_time('abatementDateTime', abate_raw, false),
        CASE WHEN time IS NULL THEN 'no onset or recordedDate (cannot be timed)' END,
        fs_check_order('onsetDateTime', ehr_ts(onset_raw), 'abatementDateTime', ehr_ts(abate_raw)),
        ehr_check_future('onsetDateTime', onset_raw),
        ehr_check_future('recordedDate', recorded_raw),
        ehr_check_future('abatementDateTime', abate_raw),
        fs_check_birth(ehr_ts(coalesce(onset_raw, recorded_raw)), birth_floor)
    ) AS _quarantine,
    coalesce(fhir_drop_status(verification), CASE WHEN verification = 'refuted' THEN 'verificationStatus refuted' END)
        AS _drop
FROM k;

CREATE OR REPLACE TEMP VIEW e_condition AS
SELECT _line, subject_id, time, 'DX//' || c.vocab || '//' || fs_part(c.code) AS code, NULL::FLOAT AS numeric_value,
       NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM v_condition WHERE _quarantine IS NULL AND _drop IS NULL
UNION ALL
SELECT _line, subject_id, greatest(ehr_known(abate_raw), time), 'DX_END//' || c.vocab || '//' || fs_part(c.code),
       NULL, NULL, NULL, enc_id
FROM v_condition WHERE _quarantine IS NULL AND _drop IS NULL AND abate_raw IS NOT NULL;

-- MedicationRequest -> RX_START//RXNORM//<code> at authoredOn; the drug is medicationCodeableConcept or the
-- Medication resource medicationReference points to. R4 MedicationRequests carry no stop time (Synthea's CSV has
-- one): no RX_STOP from FHIR.
CREATE OR REPLACE TABLE fs_stage.v_medication_request AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), coalesce(fhir_best(j.medicationCodeableConcept), m.c) AS c,
           j.medicationReference.reference AS med_ref, j.authoredOn AS authored_raw,
           ehr_known(j.authoredOn) AS time
    FROM (SELECT *, json_transform(resource, '{"medicationCodeableConcept": "JSON",
              "medicationReference": {"reference": "VARCHAR"}, "authoredOn": "VARCHAR"}') AS j
          FROM fhir_rows('raw_medication_request')) f
    LEFT JOIN fhir_medications m ON m.mid = fhir_ref_id(f.j.medicationReference.reference)
)
SELECT *,
    coalesce(
        fhir_check_common('MedicationRequest', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL AND med_ref IS NOT NULL THEN 'medicationReference to an unknown Medication: ' || med_ref
             WHEN c IS NULL THEN 'MedicationRequest without a medication code' END,
        fs_check_time('authoredOn', authored_raw, true),
        ehr_check_future('authoredOn', authored_raw),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    fhir_drop_status(status) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_medication_request AS
SELECT _line, subject_id, time, 'RX_START//' || c.vocab || '//' || fs_part(c.code) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM v_medication_request WHERE _quarantine IS NULL AND _drop IS NULL;

-- Procedure -> PX//<vocab>//<code>, known when it is over (performedPeriod.end, else its start or
-- performedDateTime).
CREATE OR REPLACE TABLE fs_stage.v_procedure AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best(j.code) AS c,
           coalesce(j.performedPeriod.start, j.performedDateTime) AS start_raw, j.performedPeriod.end AS end_raw
    FROM (SELECT *, json_transform(resource, '{"code": "JSON", "performedDateTime": "VARCHAR",
              "performedPeriod": {"start": "VARCHAR", "end": "VARCHAR"}}') AS j
          FROM fhir_rows('raw_procedure')) f
)
SELECT *, coalesce(ehr_known(end_raw), ehr_known(start_raw)) AS time,
    coalesce(
        fhir_check_common('Procedure', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL THEN 'Procedure without a code' END,
        fs_check_time('performed start', start_raw, true),
        fs_check_time('performedPeriod.end', end_raw, false),
        fs_check_order('performed start', ehr_ts(start_raw), 'performedPeriod.end', ehr_ts(end_raw)),
        ehr_check_future('performed start', start_raw),
        ehr_check_future('performedPeriod.end', end_raw),
        fs_check_birth(ehr_ts(start_raw), birth_floor)
    ) AS _quarantine,
    fhir_drop_status(status) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_procedure AS
SELECT _line, subject_id, time, 'PX//' || c.vocab || '//' || fs_part(c.code) AS code, NULL::FLOAT AS numeric_value,
       NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM v_procedure WHERE _quarantine IS NULL AND _drop IS NULL;

-- Immunization -> IMMUNIZATION//CVX//<code> at occurrenceDateTime.
CREATE OR REPLACE TABLE fs_stage.v_immunization AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best(j.vaccineCode) AS c, j.occurrenceDateTime AS date_raw,
           ehr_known(j.occurrenceDateTime) AS time
    FROM (SELECT *, json_transform(resource, '{"vaccineCode": "JSON", "occurrenceDateTime": "VARCHAR"}') AS j
          FROM fhir_rows('raw_immunization')) f
)
SELECT *,
    coalesce(
        fhir_check_common('Immunization', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL THEN 'Immunization without a vaccineCode' END,
        fs_check_time('occurrenceDateTime', date_raw, true),
        ehr_check_future('occurrenceDateTime', date_raw),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    fhir_drop_status(status) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_immunization AS
SELECT _line, subject_id, time, 'IMMUNIZATION//' || c.vocab || '//' || fs_part(c.code) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM v_immunization WHERE _quarantine IS NULL AND _drop IS NULL;

-- AllergyIntolerance -> ALLERGY//<vocab>//<code>, known like a diagnosis (recordedDate, else onset; not before
-- the end of its encounter when it has one).
CREATE OR REPLACE TABLE fs_stage.v_allergy_intolerance AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best(j.code) AS c, coalesce(j.recordedDate, j.onsetDateTime) AS date_raw,
           j.verificationStatus.coding[1].code AS verification
    FROM (SELECT *, json_transform(resource, '{"code": "JSON", "recordedDate": "VARCHAR",
              "onsetDateTime": "VARCHAR", "verificationStatus": {"coding": [{"code": "VARCHAR"}]}}') AS j
          FROM fhir_rows('raw_allergy_intolerance')) f
)
SELECT *, ehr_known_after(enc_end, date_raw) AS time,
    coalesce(
        fhir_check_common('AllergyIntolerance', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL THEN 'AllergyIntolerance without a code' END,
        fs_check_time('recordedDate', date_raw, true),
        ehr_check_future('recordedDate', date_raw),
        fs_check_birth(ehr_ts(date_raw), birth_floor)
    ) AS _quarantine,
    coalesce(fhir_drop_status(verification), CASE WHEN verification = 'refuted' THEN 'verificationStatus refuted' END)
        AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_allergy_intolerance AS
SELECT _line, subject_id, time, 'ALLERGY//' || c.vocab || '//' || fs_part(c.code) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM v_allergy_intolerance WHERE _quarantine IS NULL AND _drop IS NULL;

-- CarePlan -> CAREPLAN//<vocab>//<code> (the best-coded category: Synthea puts the SNOMED plan there) known
-- like a diagnosis, CAREPLAN_END at period.end.
CREATE OR REPLACE TABLE fs_stage.v_care_plan AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best_of(j.category) AS c, j.period.start AS start_raw,
           j.period.end AS end_raw
    FROM (SELECT *, json_transform(resource, '{"category": "JSON",
              "period": {"start": "VARCHAR", "end": "VARCHAR"}}') AS j
          FROM fhir_rows('raw_care_plan')) f
)
SELECT *, ehr_known_after(enc_end, start_raw) AS time,
    coalesce(
        fhir_check_common('CarePlan', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL THEN 'CarePlan without a coded category' END,
        fs_check_time('period.start', start_raw, true),
        fs_check_time('period.end', end_raw, false),
        fs_check_order('period.start', ehr_ts(start_raw), 'period.end', ehr_ts(end_raw)),
        ehr_check_future('period.start', start_raw),
        ehr_check_future('period.end', end_raw),
        fs_check_birth(ehr_ts(start_raw), birth_floor)
    ) AS _quarantine,
    fhir_drop_status(status) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_care_plan AS
SELECT _line, subject_id, time, 'CAREPLAN//' || c.vocab || '//' || fs_part(c.code) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM v_care_plan WHERE _quarantine IS NULL AND _drop IS NULL
UNION ALL
SELECT _line, subject_id, greatest(ehr_known(end_raw), time), 'CAREPLAN_END//' || c.vocab || '//' || fs_part(c.code),
       NULL, NULL, NULL, enc_id
FROM v_care_plan WHERE _quarantine IS NULL AND _drop IS NULL AND end_raw IS NOT NULL;

-- ImagingStudy -> one IMAGING//<DICOM modality>//<SNOMED body site> event per series, at `started`.
CREATE OR REPLACE TABLE fs_stage.v_imaging_study AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), j.started AS date_raw, ehr_known(j.started) AS time,
           list_transform(coalesce(j.series, []),
                          lambda s: {'modality': nullif(trim(s.modality.code), ''),
                                     'bodysite': nullif(trim(s.bodySite.code), ''),
                                     'modality_display': s.modality.display,
                                     'bodysite_display': s.bodySite.display}) AS series
    FROM (SELECT *, json_transform(resource, '{"started": "VARCHAR", "series": [{
              "modality": {"code": "VARCHAR", "display": "VARCHAR"},
              "bodySite": {"code": "VARCHAR", "display": "VARCHAR"}}]}') AS j
          FROM fhir_rows('raw_imaging_study')) f
)
SELECT *,
    coalesce(
        fhir_check_common('ImagingStudy', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        fs_check_time('started', date_raw, true),
        CASE WHEN len(list_filter(series, lambda s: s.modality IS NULL OR s.bodysite IS NULL)) > 0
             THEN 'series without modality or bodySite code' END,
        ehr_check_future('started', date_raw),
        fs_check_birth(time, birth_floor)
    ) AS _quarantine,
    coalesce(fhir_drop_status(status), CASE WHEN len(series) = 0 THEN 'ImagingStudy without series' END) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_imaging_study AS
SELECT _line, subject_id, time, 'IMAGING//' || fs_part(s.modality) || '//' || fs_part(s.bodysite) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM (SELECT *, unnest(series) AS s FROM v_imaging_study WHERE _quarantine IS NULL AND _drop IS NULL);

-- DiagnosticReport -> REPORT//<vocab>//<code> when issued (else its effective time): a panel's results are
-- their own Observations; the report event says the panel was reported. Synthea's note-carrying reports
-- (34117-2) repeat the DocumentReference text, which the notes table takes from the DocumentReference.
CREATE OR REPLACE TABLE fs_stage.v_diagnostic_report AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best(j.code) AS c,
           coalesce(j.effectiveDateTime, j.effectivePeriod.end) AS effective_raw, j.issued AS issued_raw
    FROM (SELECT *, json_transform(resource, '{"code": "JSON", "effectiveDateTime": "VARCHAR",
              "effectivePeriod": {"end": "VARCHAR"}, "issued": "VARCHAR"}') AS j
          FROM fhir_rows('raw_diagnostic_report')) f
)
SELECT *, greatest(ehr_known(effective_raw), ehr_ts(issued_raw)) AS time,
    coalesce(
        fhir_check_common('DiagnosticReport', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        CASE WHEN c IS NULL THEN 'DiagnosticReport without a code' END,
        fs_check_time('effectiveDateTime', effective_raw, false),
        fs_check_time('issued', issued_raw, false),
        CASE WHEN effective_raw IS NULL AND issued_raw IS NULL THEN 'no effective or issued time' END,
        ehr_check_future('effectiveDateTime', effective_raw),
        ehr_check_future('issued', issued_raw),
        fs_check_birth(ehr_ts(coalesce(effective_raw, issued_raw)), birth_floor)
    ) AS _quarantine,
    fhir_drop_status(status) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW e_diagnostic_report AS
SELECT _line, subject_id, time, 'REPORT//' || c.vocab || '//' || fs_part(c.code) AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, enc_id AS encounter_id
FROM v_diagnostic_report WHERE _quarantine IS NULL AND _drop IS NULL;
