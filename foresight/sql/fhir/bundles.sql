-- Read FHIR JSON files into fs_stage.fhir_entries, one row per resource (_line: $offset + its number); DuckDB's JSON reader streams the files
-- (typed: only Bundle.resourceType and entry[].{fullUrl, resource} are parsed out; each resource stays JSON) and
-- no bundle is parsed in Python. $files: paths; $root: the input folder (stripped from file names).
-- marker: 'empty-bundle' for a Bundle without entries, 'no-resource' for an entry without a resource,
-- 'not-a-bundle: <type>' for a .json object that is not a Bundle. _source_row is the entry's position in its
-- Bundle (an .ndjson file: the line), 1-based. The JSON of resource types not loaded ($keep lists those that
-- are) is not kept: such a row is only counted and dropped (Claims and ExplanationOfBenefits are half the bytes).

-- section: bundles (*.json, *.json.gz: one Bundle per file, or several concatenated)
INSERT INTO fs_stage.fhir_entries
WITH b AS (
    SELECT substr(filename, length($root) + 2) AS file, resourceType AS rtype,
           CASE WHEN len(coalesce(entry, [])) = 0 THEN [{'i': 1, 'entry': NULL}]
                ELSE list_transform(entry, lambda x, i: {'i': i, 'entry': x}) END AS items
    FROM read_json($files, format = 'auto', filename = true, maximum_object_size = $max_bytes,
                   columns = {'resourceType': 'VARCHAR', 'entry': 'STRUCT(fullUrl VARCHAR, resource JSON)[]'})
), e AS (
    SELECT file, rtype, it, json_extract_string(it.entry.resource, 'resourceType') AS resource_type
    FROM (SELECT file, rtype, unnest(items) AS it FROM b)
)
SELECT $offset + row_number() OVER () AS _line, file AS _source_file, it.i AS _source_row, resource_type,
       CASE WHEN rtype IS DISTINCT FROM 'Bundle' THEN 'not-a-bundle: ' || coalesce(rtype, '(no resourceType)')
            WHEN it.entry IS NULL THEN 'empty-bundle'
            WHEN it.entry.resource IS NULL THEN 'no-resource' END AS marker,
       CASE WHEN resource_type IS NULL OR list_contains($keep, resource_type) THEN it.entry.resource END AS resource,
       it.entry.fullUrl AS full_url
FROM e;

-- section: ndjson (*.ndjson, *.ndjson.gz: one resource per line, as FHIR bulk export writes them)
INSERT INTO fs_stage.fhir_entries
SELECT $offset + row_number() OVER (), file, row_number() OVER (PARTITION BY file), resource_type, NULL,
       CASE WHEN resource_type IS NULL OR list_contains($keep, resource_type) THEN json END, NULL
FROM (SELECT substr(filename, length($root) + 2) AS file, json, json_extract_string(json, 'resourceType') AS resource_type
      FROM read_json_objects($files, format = 'newline_delimited', filename = true,
                             maximum_object_size = $max_bytes));
