-- Macros of the FHIR R4 source (on top of foresight/sql/common/ehr_macros.sql). Resources are JSON values;
-- `r->'a'->>'b'` reads them, except on a macro's own parameters: DuckDB 2.0 fails to bind a nested macro call
-- whose argument applies -> to a parameter, so macros use json_extract(_string) there.
-- Nothing here parses a bundle in Python: DuckDB's JSON reader streamed the files.

-- The id a reference points at: 'urn:uuid:<id>', 'Patient/<id>', 'http://server/Patient/<id>/_history/2' -> <id>
-- (lower-case, as resource ids are keyed). Conditional references ('Patient?identifier=...') resolve to nothing.
CREATE OR REPLACE TEMP MACRO fhir_ref_id(ref) AS
    CASE WHEN contains(ref::VARCHAR, '?') THEN NULL
         ELSE nullif(lower(regexp_extract(regexp_replace(trim(ref::VARCHAR), '/_history/[^/]*$', ''),
                                          '([^/:]+)$', 1)), '') END;

-- The codings of a CodeableConcept as structs, best first when sorted: a standard vocabulary (SNOMED, LOINC,
-- RxNorm, CVX) before classifications (ICD, CPT, NDC) before anything else, then in document order.
CREATE OR REPLACE TEMP MACRO fhir_rank(system) AS
    CASE WHEN ehr_vocab(system) IN ('SNOMED', 'LOINC', 'RXNORM', 'CVX') THEN 0
         WHEN ehr_vocab(system) IN ('ICD10CM', 'ICD9CM', 'CPT', 'NDC') THEN 1 ELSE 2 END;
CREATE OR REPLACE TEMP MACRO fhir_codings(cc) AS
    list_filter(
        list_transform(coalesce(json_transform(cc, '{"coding": [{"system": "VARCHAR", "code": "VARCHAR",
                                                                   "display": "VARCHAR"}]}').coding, []),
                       lambda c, i: {'rank': fhir_rank(c.system), 'i': i, 'vocab': ehr_vocab(c.system),
                                     'code': nullif(trim(c.code), ''), 'display': c.display}),
        lambda c: c.code IS NOT NULL);
-- The best coding of one CodeableConcept, and of a list of them (e.g. CarePlan.category).
CREATE OR REPLACE TEMP MACRO fhir_best(cc) AS list_sort(fhir_codings(cc))[1];
CREATE OR REPLACE TEMP MACRO fhir_best_of(ccs) AS
    list_sort(flatten(list_transform(coalesce(ccs::JSON[], []::JSON[]), lambda cc: fhir_codings(cc))))[1];

-- An Observation's (or a component's) value[x]: numeric (valueQuantity, valueInteger) with its unit, or text
-- (valueCodeableConcept's text or display, valueString, valueBoolean, valueDateTime). One JSON parse per value
-- (json_transform), as every `->` would parse the resource again.
CREATE OR REPLACE TEMP MACRO fhir_value_of(v) AS struct_pack(
    has := v.valueQuantity IS NOT NULL OR v.valueInteger IS NOT NULL OR v.valueCodeableConcept IS NOT NULL
           OR v.valueString IS NOT NULL OR v.valueBoolean IS NOT NULL OR v.valueDateTime IS NOT NULL,
    num_raw := coalesce(v.valueQuantity.value, v.valueInteger),
    num := fs_num(coalesce(v.valueQuantity.value, v.valueInteger)),
    text := coalesce(json_extract_string(v.valueCodeableConcept, '$.text'), fhir_best(v.valueCodeableConcept).display,
                     v.valueString, v.valueBoolean, v.valueDateTime),
    unit := nullif(trim(coalesce(v.valueQuantity.unit, v.valueQuantity.code)), '')
);
CREATE OR REPLACE TEMP MACRO fhir_value(o) AS fhir_value_of(json_transform(o,
    '{"valueQuantity": {"value": "VARCHAR", "unit": "VARCHAR", "code": "VARCHAR"}, "valueInteger": "VARCHAR",
      "valueCodeableConcept": "JSON", "valueString": "VARCHAR", "valueBoolean": "VARCHAR",
      "valueDateTime": "VARCHAR"}'));

-- Resources that record something that did not (or not yet) happen are dropped with their status as reason.
CREATE OR REPLACE TEMP MACRO fhir_drop_status(status) AS
    CASE WHEN status IN ('entered-in-error', 'cancelled', 'planned', 'proposed', 'draft', 'not-done', 'preparation',
                         'registered')
         THEN 'status ' || status || ' (did not happen, or not yet)' END;

CREATE OR REPLACE TEMP MACRO fhir_check_subject(ref, known) AS
    CASE WHEN ref IS NULL THEN 'missing subject reference'
         WHEN known IS NULL THEN 'reference to an unknown Patient: ' || ref END;

-- The rows of a staged resource table with what every clinical resource needs: its patient (subject or patient)
-- and encounter (encounter, or DocumentReference's context.encounter) resolved, and the first occurrence of its
-- id (a later resource with the same type and id is a duplicate). Needs fhir_subjects and fhir_encounters.
CREATE OR REPLACE TEMP MACRO fhir_rows(tbl) AS TABLE
WITH h AS (
    SELECT _line, _source_file, _source_row, resource,
           json_transform(resource, '{"resourceType": "VARCHAR", "id": "VARCHAR", "status": "VARCHAR",
                                      "subject": {"reference": "VARCHAR"}, "patient": {"reference": "VARCHAR"},
                                      "encounter": {"reference": "VARCHAR"},
                                      "context": {"encounter": [{"reference": "VARCHAR"}]}}') AS h
    FROM query_table(tbl)
), r AS (
    SELECT _line, _source_file, _source_row, resource, h.resourceType AS rtype, h.id AS id_raw, h.status,
           coalesce(h.subject.reference, h.patient.reference) AS subj_raw,
           coalesce(h.encounter.reference, h.context.encounter[1].reference) AS enc_raw
    FROM h
), d AS (
    -- duplicates on a narrow projection (a window over the resource JSON would sort all of it)
    SELECT _line, row_number() OVER w AS nth, first_value(_source_file || ' entry ' || _source_row) OVER w AS first_at
    FROM r WHERE id_raw IS NOT NULL
    WINDOW w AS (PARTITION BY lower(trim(id_raw)) ORDER BY _line)
)
SELECT r.*, s.subject_id, s.birth_floor, fhir_ref_id(r.enc_raw) AS enc_id, e.subject_id AS enc_subject,
       e.stop AS enc_end, coalesce(d.nth, 1) AS nth, d.first_at
FROM r
LEFT JOIN d USING (_line)
LEFT JOIN fhir_subjects s ON s.pid = fhir_ref_id(r.subj_raw)
LEFT JOIN fhir_encounters e ON e.eid = fhir_ref_id(r.enc_raw);

-- The checks every fhir_rows() row gets: a duplicate id, then the patient, then a contradictory encounter.
CREATE OR REPLACE TEMP MACRO fhir_check_common(rtype, id_raw, nth, first_at, subj_raw, subject_id, enc_raw,
                                               enc_subject) AS
    coalesce(
        CASE WHEN id_raw IS NOT NULL AND nth > 1
             THEN 'duplicate ' || rtype || ' id ' || id_raw || ' (first in ' || first_at || ')' END,
        fhir_check_subject(subj_raw, subject_id),
        ehr_check_encounter('encounter', enc_raw, enc_subject, subject_id));
