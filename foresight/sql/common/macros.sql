-- The code-naming rule and the row checks in SQL, so vectorised sources build codes identical to
-- foresight.schema.make_code(). Installed on every connection by foresight.warehouse.connect(). `fs_part` mirrors
-- code_part(); `fs_ts` parses ISO 8601 date or date-time text ('2180-07-23 12:35:00', '2180-07-23', with 'T' or
-- fractional seconds) and yields NULL otherwise; `fs_uuid_subject` and `fs_split` follow uuid_subject_id() and
-- split_of().
CREATE OR REPLACE TEMP MACRO fs_part(x) AS
    coalesce(nullif(regexp_replace(regexp_replace(upper(trim(x::VARCHAR)), '\s+', '_', 'g'), '/{2,}', '/', 'g'), ''),
             'UNK');
CREATE OR REPLACE TEMP MACRO fs_ts(x) AS TRY_CAST(trim(x::VARCHAR) AS TIMESTAMP);
CREATE OR REPLACE TEMP MACRO fs_kind(code) AS
    CASE WHEN code LIKE 'MEDS\_%' ESCAPE '\' THEN 'MEDS' ELSE split_part(code, '//', 1) END;
CREATE OR REPLACE TEMP MACRO fs_id(x) AS TRY_CAST(trim(x::VARCHAR) AS BIGINT);
CREATE OR REPLACE TEMP MACRO fs_num(x) AS TRY_CAST(trim(x::VARCHAR) AS DOUBLE);
-- ICD-style hierarchy by truncation, nearest ancestor first: fs_prefixes('DX//ICD10CM//', 'E1165', 3)
-- = ['DX//ICD10CM//E116', 'DX//ICD10CM//E11'].
CREATE OR REPLACE TEMP MACRO fs_prefixes(prefix, value, min_len) AS
    list_transform(range(length(value) - 1, min_len - 1, -1), lambda i: prefix || left(value, i));
-- Row checks shared by every source. Each returns a reason (naming the column and the raw value) or NULL;
-- a row's quarantine reason is the coalesce() of its checks, so the first failing check is reported.
CREATE OR REPLACE TEMP MACRO fs_check_subject(raw, known) AS
    CASE WHEN raw IS NULL THEN 'missing subject_id'
         WHEN fs_id(raw) IS NULL THEN 'non-integer subject_id: ' || raw
         WHEN known IS NULL THEN 'unknown subject_id (not in the patients table): ' || raw END;
CREATE OR REPLACE TEMP MACRO fs_check_id(col, raw, required) AS
    CASE WHEN raw IS NULL THEN CASE WHEN required THEN 'missing ' || col END
         WHEN fs_id(raw) IS NULL THEN 'non-integer ' || col || ': ' || raw END;
CREATE OR REPLACE TEMP MACRO fs_check_time(col, raw, required) AS
    CASE WHEN raw IS NULL THEN CASE WHEN required THEN 'missing ' || col END
         WHEN fs_ts(raw) IS NULL THEN 'unparseable ' || col || ': ' || raw
         WHEN year(fs_ts(raw)) NOT BETWEEN 1800 AND 2300 THEN 'implausible ' || col || ': ' || raw END;
-- fs_check_time for sources whose times are local wall-clock times without a zone (MIMIC-IV: every time is a
-- shifted local time). fs_ts() would silently drop an offset or zone name ('2150-05-01 10:00:00+02:00', '...Z',
-- '... UTC'); converting it to UTC would shift the row by hours against the zone-less times around it, and keeping
-- its wall clock would guess that the offset is the local one. Neither is safe, so the value is rejected with its
-- own reason. The length test keeps the regex off the usual 10- and 19-character values.
CREATE OR REPLACE TEMP MACRO fs_check_local_time(col, raw, required) AS
    coalesce(fs_check_time(col, raw, required),
             CASE WHEN length(trim(raw)) > 16
                       AND regexp_matches(trim(raw), '\d\d:\d\d(:\d\d(\.\d*)?)?\s*([Zz]|[+-]\d\d(:?\d\d)?|[A-Za-z][A-Za-z_/+-]*)$')
                  THEN 'time zone in ' || col || ' (this source''s times are local, without a zone): ' || raw END);
CREATE OR REPLACE TEMP MACRO fs_check_num(col, raw, nonnegative) AS
    CASE WHEN raw IS NULL THEN NULL
         WHEN fs_num(raw) IS NULL THEN 'non-numeric ' || col || ': ' || raw
         WHEN NOT isfinite(fs_num(raw)) OR abs(fs_num(raw)) > 1e9 THEN 'absurd ' || col || ': ' || raw
         WHEN nonnegative AND fs_num(raw) < 0 THEN 'negative ' || col || ': ' || raw END;
CREATE OR REPLACE TEMP MACRO fs_check_order(first_col, first_time, then_col, then_time) AS
    CASE WHEN then_time < first_time THEN then_col || ' before ' || first_col END;
CREATE OR REPLACE TEMP MACRO fs_check_birth(t, birth_floor) AS
    CASE WHEN t < birth_floor THEN 'time before birth: ' || strftime(t, '%Y-%m-%d %H:%M:%S') END;
-- ISO 8601 text with a UTC offset ('2021-08-22T20:26:50-07:00', '...Z') as UTC wall-clock time. fs_ts() alone
-- drops the offset (keeps local wall-clock), which would shift FHIR times by hours against Synthea's UTC CSV times.
CREATE OR REPLACE TEMP MACRO fs_ts_utc(x) AS
    CASE WHEN regexp_matches(trim(x::VARCHAR), '[+-]\d\d:\d\d$')
         THEN fs_ts(left(trim(x::VARCHAR), length(trim(x::VARCHAR)) - 6))
              - to_minutes((CASE WHEN substr(trim(x::VARCHAR), -6, 1) = '-' THEN -1 ELSE 1 END)
                           * (TRY_CAST(substr(trim(x::VARCHAR), -5, 2) AS INTEGER) * 60
                              + TRY_CAST(substr(trim(x::VARCHAR), -2, 2) AS INTEGER)))
         ELSE fs_ts(regexp_replace(trim(x::VARCHAR), '[Zz]$', '')) END;
-- "Future" is after the moment the load runs (UTC, like every event time of the UUID-keyed sources).
CREATE OR REPLACE TEMP MACRO fs_check_future(col, t) AS
    CASE WHEN t > (now() AT TIME ZONE 'UTC')
         THEN 'time in the future (after the load ran): ' || col || ' ' || strftime(t, '%Y-%m-%d %H:%M:%S') END;
-- Stable subject id for a non-integer patient id (Synthea/FHIR UUIDs), same rule as uuid_subject_id().
CREATE OR REPLACE TEMP MACRO fs_uuid_subject(x) AS
    (4611686018427387904 + (('0x' || substr(md5(lower(trim(x::VARCHAR))), 1, 16))::UBIGINT
                            % 4611686018427387904::UBIGINT))::BIGINT;
CREATE OR REPLACE TEMP MACRO fs_split(subject_id) AS
    CASE WHEN ('0x' || substr(md5(subject_id::VARCHAR), 1, 8))::UBIGINT % 100 < 80 THEN 'train'
         WHEN ('0x' || substr(md5(subject_id::VARCHAR), 1, 8))::UBIGINT % 100 < 90 THEN 'tuning'
         ELSE 'held_out' END;
