-- FHIR DocumentReference -> the `notes` table (no event): the first text attachment, base64-decoded to UTF-8,
-- for the notes source (MedCAT concepts -> NOTE//... events) to annotate. A note about an encounter is complete
-- when the encounter is: its time is the later of its date and context.period.end (Synthea dates notes at the
-- encounter's start, yet they list what the whole encounter did).

CREATE OR REPLACE TABLE fs_stage.v_document_reference AS
WITH t AS (
    SELECT f.* EXCLUDE (resource, j), fhir_best(j.type) AS c,
           list_filter(list_transform(coalesce(j.content, []), lambda x: x.attachment),
                       lambda a: a.data IS NOT NULL)[1] AS att,
           j.date AS date_raw, j.context.period.end AS end_raw
    FROM (SELECT *, json_transform(resource, '{"type": "JSON", "date": "VARCHAR",
              "content": [{"attachment": {"contentType": "VARCHAR", "data": "VARCHAR"}}],
              "context": {"period": {"end": "VARCHAR"}}}') AS j
          FROM fhir_rows('raw_document_reference')) f
)
SELECT *, TRY(decode(from_base64(att.data))) AS text,
       greatest(ehr_known(date_raw), ehr_ts(end_raw)) AS time,
    coalesce(
        fhir_check_common('DocumentReference', id_raw, nth, first_at, subj_raw, subject_id, enc_raw, enc_subject),
        fs_check_time('date', date_raw, false),
        fs_check_time('context.period.end', end_raw, false),
        CASE WHEN date_raw IS NULL AND end_raw IS NULL THEN 'no date or context.period.end (cannot be timed)' END,
        CASE WHEN att IS NOT NULL AND TRY(decode(from_base64(att.data))) IS NULL
             THEN 'attachment data is not base64-encoded UTF-8 text' END,
        ehr_check_future('date', date_raw),
        fs_check_birth(ehr_ts(date_raw), birth_floor)
    ) AS _quarantine,
    coalesce(fhir_drop_status(status),
             CASE WHEN att IS NULL THEN 'no inline attachment data (URL-only documents are not fetched)'
                  WHEN coalesce(att.contentType, 'text/plain') NOT LIKE 'text/%'
                  THEN 'attachment is not text: ' || att.contentType END) AS _drop
FROM t;

CREATE OR REPLACE TEMP VIEW n_document_reference AS
SELECT _line, subject_id, time, coalesce(id_raw, _source_file || '#' || _source_row) AS note_id,
       c.vocab || '//' || c.code AS note_type, enc_id AS encounter_id,
       text
FROM v_document_reference WHERE _quarantine IS NULL AND _drop IS NULL;

CREATE OR REPLACE TEMP VIEW e_document_reference AS
SELECT _line, subject_id, time, NULL::VARCHAR AS code, NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit,
       NULL AS encounter_id
FROM v_document_reference WHERE false;
