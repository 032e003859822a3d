-- FHIR core: Patient and Encounter resources. Inputs: raw_patient, raw_encounter (_line, _source_file,
-- _source_row, resource JSON); fs_load(source). Outputs: v_patient, fhir_subjects, v_encounter, fhir_encounters,
-- e_patient, e_encounter. Times are UTC (offsets applied); see ehr_macros.sql.

-- Patient: the first resource with an id wins. Subject id: this source's subject_map row, else the stable hash
-- of the lower-case id, the rule the Synthea CSV source uses, so the two exports of one population agree.
CREATE OR REPLACE TABLE fs_stage.v_patient AS
WITH j AS (
    SELECT _line, _source_file, _source_row,
           json_transform(resource, '{"id": "VARCHAR", "gender": "VARCHAR", "birthDate": "VARCHAR",
                                      "deceasedDateTime": "VARCHAR",
                                      "extension": [{"url": "VARCHAR", "extension": [{"url": "VARCHAR",
                                          "valueCoding": {"code": "VARCHAR"}, "valueString": "VARCHAR"}]}]}') AS j
    FROM raw_patient
), t AS (
    SELECT _line, _source_file, _source_row, j.id AS id_raw, lower(trim(j.id)) AS pid, j.gender,
           j.birthDate AS birth_raw, fs_ts(j.birthDate) AS birth, j.deceasedDateTime AS death_raw,
           ehr_known(j.deceasedDateTime) AS death,
           -- US Core race/ethnicity extensions: the OMB category code, else the text
           list_filter(coalesce(j.extension, []),
                       lambda e: e.url = 'http://hl7.org/fhir/us/core/StructureDefinition/us-core-race')[1].extension
               AS race_ext,
           list_filter(coalesce(j.extension, []),
                       lambda e: e.url = 'http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity')[1].extension
               AS eth_ext
    FROM j
), d AS (
    SELECT _line, row_number() OVER w AS nth, first_value(_source_file || ' entry ' || _source_row) OVER w AS first_at
    FROM t WINDOW w AS (PARTITION BY pid ORDER BY _line)
), u AS (
    SELECT t.*, d.nth, d.first_at,
        CASE WHEN race_ext IS NOT NULL THEN ehr_race(list_filter(race_ext, lambda e: e.url = 'ombCategory')[1].valueCoding.code,
                                                     list_filter(race_ext, lambda e: e.url = 'text')[1].valueString)
             END AS race,
        CASE WHEN eth_ext IS NOT NULL THEN ehr_ethnicity(
                 list_filter(eth_ext, lambda e: e.url = 'ombCategory')[1].valueCoding.code,
                 list_filter(eth_ext, lambda e: e.url = 'text')[1].valueString) END AS ethnicity
    FROM t JOIN d USING (_line)
)
-- birthDate and deceasedDateTime are optional in FHIR: one that fails its check is set to NULL and the Patient
-- kept (one bad date must not remove a patient and every resource of theirs); the row counts as loaded and
-- _field_issue names the field (reported in the load's warnings, Load.finish_table). Only a Patient without an
-- id, or a duplicate, is quarantined.
, c AS (
    SELECT * EXCLUDE (birth, death),
        coalesce(fs_check_time('birthDate', birth_raw, false), ehr_check_future('birthDate', birth_raw))
            AS birth_issue,
        coalesce(fs_check_time('deceasedDateTime', death_raw, false),
                 ehr_check_future('deceasedDateTime', death_raw)) AS death_issue
    FROM u
), f AS (
    SELECT * EXCLUDE (birth_issue, death_issue),
        CASE WHEN birth_issue IS NULL THEN fs_ts(birth_raw) END AS birth,
        coalesce(death_issue,
                 CASE WHEN birth_issue IS NULL AND fs_ts_utc(death_raw) < ehr_birth_floor(fs_ts(birth_raw))
                      THEN 'deceasedDateTime before birthDate: ' || death_raw END) AS death_issue,
        birth_issue
    FROM c
)
SELECT * EXCLUDE (birth_issue, death_issue),
    CASE WHEN death_issue IS NULL THEN ehr_known(death_raw) END AS death,
    coalesce(
        CASE WHEN pid IS NULL OR pid = '' THEN 'Patient without id' END,
        CASE WHEN nth > 1 THEN 'duplicate Patient id ' || id_raw || ' (first in ' || first_at || ')' END
    ) AS _quarantine,
    CASE WHEN birth IS NULL AND (death_issue IS NOT NULL OR ehr_known(death_raw) IS NULL)
              AND nullif(trim(gender), '') IS NULL AND race IS NULL AND ethnicity IS NULL
         THEN 'Patient without birthDate, gender, race, ethnicity or death: nothing to record' END AS _drop,
    nullif(concat_ws('; ', birth_issue, death_issue), '') AS _field_issue
FROM f;

CREATE OR REPLACE TEMP TABLE fhir_subjects AS
SELECT p.pid, coalesce(m.subject_id, fs_uuid_subject(p.pid)) AS subject_id, p.birth,
       ehr_birth_floor(p.birth) AS birth_floor
FROM v_patient p
LEFT JOIN subject_map m ON m.source = (SELECT source FROM fs_load) AND m.source_id = p.pid
WHERE p._quarantine IS NULL;

-- fhir_rows() joins encounters; Encounter rows themselves reference none yet.
CREATE OR REPLACE TEMP TABLE fhir_encounters (eid VARCHAR, subject_id BIGINT, start TIMESTAMP, stop TIMESTAMP,
                                              cls VARCHAR);

CREATE OR REPLACE TABLE fs_stage.v_encounter AS
WITH t AS (
    SELECT f.* EXCLUDE (resource), lower(trim(f.id_raw)) AS eid, j.period.start AS start_raw,
           ehr_ts(j.period.start) AS start, j.period.end AS stop_raw, ehr_known(j.period.end) AS stop,
           j.class.code AS class_raw, ehr_encounter_class(j.class.code) AS cls,
           coalesce(json_extract_string(j.type[1], '$.text'), fhir_best(j.type[1]).display) AS description
    FROM (SELECT *, json_transform(resource, '{"period": {"start": "VARCHAR", "end": "VARCHAR"},
                                                "class": {"code": "VARCHAR"}, "type": ["JSON"]}') AS j
          FROM fhir_rows('raw_encounter')) f
)
SELECT *,
    coalesce(
        CASE WHEN eid IS NULL OR eid = '' THEN 'Encounter without id' END,
        fhir_check_common('Encounter', id_raw, nth, first_at, subj_raw, subject_id, NULL, NULL),
        CASE WHEN nullif(trim(class_raw), '') IS NULL THEN 'missing class' END,
        fs_check_time('period.start', start_raw, true),
        fs_check_time('period.end', stop_raw, false),
        fs_check_order('period.start', start, 'period.end', stop),
        ehr_check_future('period.start', start_raw),
        ehr_check_future('period.end', stop_raw),
        fs_check_birth(start, birth_floor)
    ) AS _quarantine,
    fhir_drop_status(status) AS _drop
FROM t;

INSERT INTO fhir_encounters
SELECT eid, subject_id, start, stop, cls FROM v_encounter WHERE _quarantine IS NULL AND _drop IS NULL;

-- Same codes as the Synthea CSV (core.sql there): ADMIT/DISCHARGE for hospital-type classes, ENCOUNTER otherwise.
CREATE OR REPLACE TEMP VIEW e_encounter AS
WITH e AS (SELECT * FROM v_encounter WHERE _quarantine IS NULL AND _drop IS NULL)
SELECT _line, subject_id, start AS time,
       CASE WHEN ehr_is_hospital(cls) THEN 'ADMIT//' ELSE 'ENCOUNTER//' END || cls AS code,
       NULL::FLOAT AS numeric_value, description AS text_value, NULL AS unit, eid AS encounter_id
FROM e
UNION ALL
SELECT _line, subject_id, stop, 'DISCHARGE//' || cls, NULL, description, NULL, eid
FROM e WHERE ehr_is_hospital(cls) AND stop IS NOT NULL;

-- Static GENDER/RACE/ETHNICITY; MEDS_BIRTH at birthDate (00:00); MEDS_DEATH at deceasedDateTime.
CREATE OR REPLACE TEMP VIEW e_patient AS
WITH p AS (SELECT v.*, s.subject_id FROM v_patient v JOIN fhir_subjects s USING (pid) WHERE v._quarantine IS NULL)
SELECT _line, subject_id, NULL::TIMESTAMP AS time,
       'GENDER//' || CASE lower(trim(gender)) WHEN 'male' THEN 'M' WHEN 'female' THEN 'F' ELSE fs_part(gender) END
           AS code,
       NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, NULL AS encounter_id
FROM p WHERE nullif(trim(gender), '') IS NOT NULL
UNION ALL
SELECT _line, subject_id, NULL, 'RACE//' || race, NULL, NULL, NULL, NULL FROM p WHERE race IS NOT NULL
UNION ALL
SELECT _line, subject_id, NULL, 'ETHNICITY//' || ethnicity, NULL, NULL, NULL, NULL FROM p WHERE ethnicity IS NOT NULL
UNION ALL
SELECT _line, subject_id, birth, 'MEDS_BIRTH', NULL, NULL, NULL, NULL FROM p WHERE birth IS NOT NULL
UNION ALL
SELECT _line, subject_id, death, 'MEDS_DEATH', NULL, NULL, NULL, NULL FROM p WHERE death IS NOT NULL;
