-- Macros shared by the EHR-export sources keyed on patient UUIDs: Synthea CSV (foresight/sql/synthea) and
-- FHIR R4 (foresight/sql/fhir). They make the two copies of one Synthea export produce the same codes at the same
-- times, so keep them in one place.
--
-- Times. Every event time of these sources is UTC wall-clock: date-times with an offset ('...-07:00', '...Z') are
-- converted with fs_ts_utc. Some columns hold a date only (Synthea's condition, allergy and care-plan START/STOP,
-- BIRTHDATE, DEATHDATE), and it is a LOCAL date of a zone the export does not name (Synthea writes times in UTC
-- but these dates in the patient's zone). A fact dated to a day is known by the end of that day wherever the
-- patient lives: ehr_known places it at the end of the day in the westernmost zone (UTC-12), date + 35:59:59 UTC,
-- so it is never earlier than the truth (its midnight would put it before the very encounter that recorded it;
-- 23:59:59 UTC would still be up to 12 hours early). Birth is the exception: MEDS_BIRTH at the date's 00:00.

CREATE OR REPLACE TEMP MACRO ehr_is_date(x) AS regexp_matches(trim(x::VARCHAR), '^\d{4}-\d{2}-\d{2}$');

CREATE OR REPLACE TEMP MACRO ehr_ts(x) AS fs_ts_utc(x);

CREATE OR REPLACE TEMP MACRO ehr_known(x) AS
    CASE WHEN ehr_is_date(x) THEN fs_ts(x) + INTERVAL 129599 SECOND ELSE fs_ts_utc(x) END;

-- A fact recorded in an encounter (a diagnosis, an allergy, a care plan) is known once that encounter is over:
-- for an inpatient stay that is discharge, the same rule as MIMIC's billing codes (a diagnosis timed at admission
-- would leak the stay's outcome into predictions made at admission). If the fact's own time is later than the
-- encounter's end it is timed there instead; a date-only own time counts as later only when its day is after the
-- day the encounter ended. Without a (known) encounter the fact is timed by its own time.
CREATE OR REPLACE TEMP MACRO ehr_known_after(enc_end, x) AS
    CASE WHEN enc_end IS NULL THEN ehr_known(x)
         WHEN ehr_is_date(x) THEN CASE WHEN fs_ts(x)::DATE > enc_end::DATE THEN ehr_known(x) ELSE enc_end END
         ELSE greatest(enc_end, fs_ts_utc(x)) END;

-- "Future" is judged on the instant a value names (a date-only value: its day's start), against the load's clock.
CREATE OR REPLACE TEMP MACRO ehr_check_future(col, x) AS
    fs_check_future(col, CASE WHEN ehr_is_date(x) THEN fs_ts(x) ELSE fs_ts_utc(x) END);

-- Birth dates are local dates and event times UTC, so an event may legitimately sit up to 14 hours (the widest
-- UTC offset) before the birth date's midnight; anything earlier is "before birth" and quarantined.
CREATE OR REPLACE TEMP MACRO ehr_birth_floor(birth) AS birth - INTERVAL 14 HOUR;

CREATE OR REPLACE TEMP MACRO ehr_check_patient(col, raw, known) AS
    CASE WHEN raw IS NULL OR trim(raw) = '' THEN 'missing ' || col
         WHEN known IS NULL THEN 'unknown patient (not among the loaded patients): ' || col || ' ' || raw END;

-- An encounter reference that names another patient's encounter is contradictory: quarantined. An encounter that
-- is not in the input at all only loses its timing anchor (the row's own time is used).
CREATE OR REPLACE TEMP MACRO ehr_check_encounter(col, raw, enc_subject, row_subject) AS
    CASE WHEN enc_subject IS NOT NULL AND enc_subject <> row_subject
         THEN col || ' belongs to another patient: ' || raw END;

-- Encounter classes: Synthea's class names and FHIR's v3 ActCode codes, to one vocabulary. Hospital-type classes
-- get ADMIT//<class> at the start and DISCHARGE//<class> at the end; the others ENCOUNTER//<class> at the start.
CREATE OR REPLACE TEMP MACRO ehr_encounter_class(c) AS
    CASE upper(trim(c::VARCHAR))
        WHEN 'INPATIENT' THEN 'INPATIENT' WHEN 'IMP' THEN 'INPATIENT' WHEN 'ACUTE' THEN 'INPATIENT'
        WHEN 'NONAC' THEN 'INPATIENT'
        WHEN 'EMERGENCY' THEN 'EMERGENCY' WHEN 'EMER' THEN 'EMERGENCY'
        WHEN 'OBSENC' THEN 'OBSERVATION'
        WHEN 'AMB' THEN 'AMBULATORY' WHEN 'HH' THEN 'HOME' WHEN 'VR' THEN 'VIRTUAL' WHEN 'SS' THEN 'SHORT_STAY'
        WHEN 'FLD' THEN 'FIELD' WHEN 'PRENC' THEN 'PREADMISSION'
        ELSE fs_part(c) END;
CREATE OR REPLACE TEMP MACRO ehr_is_hospital(cls) AS cls IN ('INPATIENT', 'EMERGENCY', 'OBSERVATION');

-- Code systems (FHIR system URIs and Synthea's SYSTEM column values) to the VOCAB part of a code.
CREATE OR REPLACE TEMP MACRO ehr_vocab(system) AS
    CASE lower(trim(system::VARCHAR))
        WHEN 'http://snomed.info/sct' THEN 'SNOMED' WHEN 'snomed-ct' THEN 'SNOMED' WHEN 'snomed' THEN 'SNOMED'
        WHEN 'http://loinc.org' THEN 'LOINC' WHEN 'loinc' THEN 'LOINC'
        WHEN 'http://www.nlm.nih.gov/research/umls/rxnorm' THEN 'RXNORM' WHEN 'rxnorm' THEN 'RXNORM'
        WHEN 'http://hl7.org/fhir/sid/cvx' THEN 'CVX' WHEN 'cvx' THEN 'CVX'
        WHEN 'http://hl7.org/fhir/sid/icd-10-cm' THEN 'ICD10CM' WHEN 'icd-10-cm' THEN 'ICD10CM'
        WHEN 'icd10cm' THEN 'ICD10CM'
        WHEN 'http://hl7.org/fhir/sid/icd-9-cm' THEN 'ICD9CM' WHEN 'icd-9-cm' THEN 'ICD9CM' WHEN 'icd9cm' THEN 'ICD9CM'
        WHEN 'http://www.ama-assn.org/go/cpt' THEN 'CPT' WHEN 'cpt' THEN 'CPT'
        WHEN 'http://hl7.org/fhir/sid/ndc' THEN 'NDC' WHEN 'ndc' THEN 'NDC'
        WHEN 'http://dicom.nema.org/resources/ontology/dcm' THEN 'DCM'
        ELSE fs_part(nullif(regexp_extract(trim(system::VARCHAR), '([^/:|#]+)/?$', 1), '')) END;

-- Race and ethnicity: FHIR US Core carries OMB category codes; Synthea's CSV the words below. Both map to the
-- CSV words, so the two exports of one population give the same RACE//... and ETHNICITY//... codes.
CREATE OR REPLACE TEMP MACRO ehr_race(omb_code, txt) AS
    CASE omb_code WHEN '2106-3' THEN 'WHITE' WHEN '2054-5' THEN 'BLACK' WHEN '2028-9' THEN 'ASIAN'
                  WHEN '1002-5' THEN 'NATIVE' WHEN '2076-8' THEN 'HAWAIIAN' WHEN '2131-1' THEN 'OTHER'
                  ELSE fs_part(txt) END;
CREATE OR REPLACE TEMP MACRO ehr_ethnicity(omb_code, txt) AS
    CASE omb_code WHEN '2135-2' THEN 'HISPANIC' WHEN '2186-5' THEN 'NONHISPANIC' ELSE fs_part(txt) END;
