-- Code descriptions for FHIR codes: the display of the coding each event was built from (FHIR bundles carry no
-- dictionary). Each `-- section: <group>` selects (code, description, parent_codes) right after that group
-- is staged; only codes that occur in the load reach `codes`.

-- section: core (encounter classes)
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT CASE WHEN ehr_is_hospital(cls) THEN 'ADMIT//' ELSE 'ENCOUNTER//' END || cls AS code,
           lower(cls) || CASE WHEN ehr_is_hospital(cls) THEN ' admission' ELSE ' encounter' END AS description
    FROM fhir_encounters
    UNION ALL
    SELECT 'DISCHARGE//' || cls, 'discharge from ' || lower(cls) || ' stay' FROM fhir_encounters
    WHERE ehr_is_hospital(cls)
)
ORDER BY code, description;

-- section: clinical
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT 'DX//' || c.vocab || '//' || fs_part(c.code) AS code, c.display AS description FROM v_condition
    UNION ALL SELECT 'DX_END//' || c.vocab || '//' || fs_part(c.code), c.display || ' (resolved)' FROM v_condition
    UNION ALL SELECT 'RX_START//' || c.vocab || '//' || fs_part(c.code), c.display FROM v_medication_request
    UNION ALL SELECT 'PX//' || c.vocab || '//' || fs_part(c.code), c.display FROM v_procedure
    UNION ALL SELECT 'IMMUNIZATION//' || c.vocab || '//' || fs_part(c.code), c.display FROM v_immunization
    UNION ALL SELECT 'ALLERGY//' || c.vocab || '//' || fs_part(c.code), c.display FROM v_allergy_intolerance
    UNION ALL SELECT 'CAREPLAN//' || c.vocab || '//' || fs_part(c.code), c.display FROM v_care_plan
    UNION ALL SELECT 'CAREPLAN_END//' || c.vocab || '//' || fs_part(c.code), c.display || ' (end)' FROM v_care_plan
    UNION ALL SELECT 'REPORT//' || c.vocab || '//' || fs_part(c.code), c.display FROM v_diagnostic_report
    UNION ALL SELECT 'IMAGING//' || fs_part(s.modality) || '//' || fs_part(s.bodysite),
                     s.modality_display || ' of ' || s.bodysite_display
              FROM (SELECT unnest(series) AS s FROM v_imaging_study)
)
WHERE description IS NOT NULL AND code IS NOT NULL
ORDER BY code, description;

-- section: observations
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT kind || '//' || c.vocab || '//' || fs_part(c.code) AS code, c.display AS description FROM v_observation
    UNION ALL
    SELECT kind || '//' || x.c.vocab || '//' || fs_part(x.c.code), x.c.display
    FROM (SELECT kind, unnest(comps) AS x FROM v_observation)
)
WHERE description IS NOT NULL AND code IS NOT NULL
ORDER BY code, description;
