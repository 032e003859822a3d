-- Free-text notes -> NOTE//<VOCAB>//<CODE> events. Read by foresight/sources/notes.py in two sections: `validate`
-- runs before annotation (which notes can be annotated at all), `events` after MedCAT has staged its mentions in
-- the TEMP table note_mentions(_line, cui, code, description, status, ...).
--
-- Input: fs_stage.raw_notes(_line, subject_id, time, charttime, chartdate, date, text, note_id, row_id,
-- encounter_id, hadm_id, note_type, _text_error), every column VARCHAR; fs_notes_load(source, max_chars,
-- history_seconds) holds this load's settings.
--
-- Subjects: a note is about a patient the warehouse already knows, i.e. one with events from another source (load
-- the structured data first). An integer subject_id is that subject; any other id (a Synthea/FHIR patient UUID) is
-- looked up in subject_map. Times: a note is known when it is written; a date-only time is the end of that day
-- (like a MIMIC chartdate, it is not known at its midnight); times with a UTC offset are converted to UTC.

-- section: validate
CREATE OR REPLACE TEMP TABLE notes_known AS
SELECT DISTINCT subject_id FROM events WHERE source <> (SELECT source FROM fs_notes_load);

CREATE OR REPLACE TEMP TABLE notes_idmap AS
SELECT lower(trim(source_id)) AS source_id, min(subject_id) AS subject_id FROM subject_map
GROUP BY 1 HAVING count(DISTINCT subject_id) = 1;

CREATE OR REPLACE TEMP TABLE notes_birth AS
SELECT subject_id, min(time) AS birth FROM events WHERE code = 'MEDS_BIRTH' GROUP BY 1;

CREATE OR REPLACE TABLE fs_stage.v_notes AS
WITH r AS (
    SELECT _line, nullif(trim(subject_id), '') AS subject_raw,
           nullif(trim(coalesce(time, charttime, chartdate, date)), '') AS time_raw, text,
           nullif(trim(coalesce(note_id, row_id)), '') AS note_id_raw,
           nullif(trim(coalesce(encounter_id, hadm_id)), '') AS encounter_id, nullif(trim(note_type), '') AS note_type,
           _text_error
    FROM raw_notes
), s AS (
    SELECT r.*, coalesce(k.subject_id, k2.subject_id) AS subject_id,
           CASE WHEN regexp_matches(time_raw, '^\d{4}-\d{2}-\d{2}$') THEN fs_ts(time_raw) + INTERVAL 86399 SECOND
                ELSE fs_ts_utc(time_raw) END AS time
    FROM r
    LEFT JOIN notes_known k ON k.subject_id = fs_id(r.subject_raw)
    LEFT JOIN notes_idmap m ON fs_id(r.subject_raw) IS NULL AND m.source_id = lower(r.subject_raw)
    LEFT JOIN notes_known k2 ON k2.subject_id = m.subject_id
)
SELECT s._line, s.subject_id, s.time, s.text, coalesce(s.note_id_raw, 'line ' || s._line) AS note_id,
       s.encounter_id, s.note_type,
    coalesce(
        CASE WHEN s.subject_raw IS NULL THEN 'missing subject_id'
             WHEN s.subject_id IS NULL
             THEN 'unknown subject (no events for it in this warehouse; load its structured data first): '
                  || s.subject_raw END,
        fs_check_time('time', s.time_raw, true),
        CASE WHEN s.time IS NULL THEN 'unparseable time: ' || s.time_raw END,
        s._text_error,
        CASE WHEN length(s.text) > (SELECT max_chars FROM fs_notes_load)
             THEN 'note of ' || length(s.text) || ' characters is over the limit of '
                  || (SELECT max_chars FROM fs_notes_load) || ' (FORESIGHT_NOTES_MAX_CHARS)' END,
        fs_check_birth(s.time, b.birth)
    ) AS _quarantine,
    CASE WHEN s.text IS NULL OR NOT regexp_matches(s.text, '\S') THEN 'empty note'
         WHEN s.note_id_raw IS NOT NULL AND row_number() OVER (
                  PARTITION BY s.subject_raw, s.note_id_raw, md5(s.text) ORDER BY s._line) > 1
         THEN 'duplicate note (same subject, note_id and text as an earlier row)' END AS _drop
FROM s LEFT JOIN notes_birth b USING (subject_id);

-- section: events
-- One event per (note, concept): at the note's time if the note affirms it now; "history of X" (and every other
-- HISTORICAL mention) before the note, by history_seconds (default one day) but never before birth, so the model
-- reads it as a pre-existing fact rather than something found at this encounter. A concept both current and
-- historical in one note is current. Negated, hypothetical and family mentions make no event.
CREATE OR REPLACE TEMP TABLE note_concepts AS
SELECT _line, code, min(description) AS description, bool_or(status = 'current') AS is_current
FROM note_mentions WHERE status IN ('current', 'historical')
GROUP BY _line, code;

UPDATE v_notes SET _drop = CASE
        WHEN _line IN (SELECT _line FROM note_mentions) THEN 'every concept mention negated, hypothetical or about family'
        ELSE 'no concept found' END
WHERE _quarantine IS NULL AND _drop IS NULL AND _line NOT IN (SELECT _line FROM note_concepts);

CREATE OR REPLACE TEMP VIEW e_notes AS
SELECT c._line, v.subject_id,
       CASE WHEN c.is_current THEN v.time
            ELSE greatest(v.time - to_seconds((SELECT history_seconds FROM fs_notes_load)),
                          coalesce(b.birth, v.time - to_seconds((SELECT history_seconds FROM fs_notes_load))))
       END AS time,
       c.code, NULL::FLOAT AS numeric_value, NULL::VARCHAR AS text_value, NULL::VARCHAR AS unit, v.encounter_id
FROM note_concepts c JOIN v_notes v USING (_line) LEFT JOIN notes_birth b USING (subject_id)
WHERE v._quarantine IS NULL;
