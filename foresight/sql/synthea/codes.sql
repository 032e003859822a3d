-- Code descriptions for Synthea codes, from the DESCRIPTION columns the rows carry (Synthea ships no separate
-- dictionary). Each `-- section: <group>` selects (code, description, parent_codes) and runs right after
-- that table group is staged; only codes that occur in the load reach `codes`. SNOMED/RxNorm/LOINC hierarchies
-- are not in the export, so parent_codes stay empty.

-- section: core (encounter classes)
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT CASE WHEN ehr_is_hospital(cls) THEN 'ADMIT//' ELSE 'ENCOUNTER//' END || cls AS code,
           lower(cls) || CASE WHEN ehr_is_hospital(cls) THEN ' admission' ELSE ' encounter' END AS description
    FROM synthea_encounters
    UNION ALL
    SELECT 'DISCHARGE//' || cls, 'discharge from ' || lower(cls) || ' stay' FROM synthea_encounters
    WHERE ehr_is_hospital(cls)
)
ORDER BY code, description;

-- section: clinical (DESCRIPTION of each coded row)
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT 'DX//' || vocab || '//' || fs_part(code_raw) AS code, description FROM v_conditions
    UNION ALL SELECT 'DX_END//' || vocab || '//' || fs_part(code_raw), description || ' (resolved)' FROM v_conditions
    UNION ALL SELECT 'RX_START//RXNORM//' || fs_part(code_raw), description FROM v_medications
    UNION ALL SELECT 'RX_STOP//RXNORM//' || fs_part(code_raw), description || ' (stop)' FROM v_medications
    UNION ALL SELECT 'PX//' || vocab || '//' || fs_part(code_raw), description FROM v_procedures
    UNION ALL SELECT 'IMMUNIZATION//CVX//' || fs_part(code_raw), description FROM v_immunizations
    UNION ALL SELECT 'ALLERGY//' || vocab || '//' || fs_part(code_raw), description FROM v_allergies
    UNION ALL SELECT 'CAREPLAN//SNOMED//' || fs_part(code_raw), description FROM v_careplans
    UNION ALL SELECT 'CAREPLAN_END//SNOMED//' || fs_part(code_raw), description || ' (end)' FROM v_careplans
    UNION ALL SELECT 'DEVICE//SNOMED//' || fs_part(code_raw), description FROM v_devices
    UNION ALL SELECT 'DEVICE_END//SNOMED//' || fs_part(code_raw), description || ' (end)' FROM v_devices
    UNION ALL SELECT 'IMAGING//' || fs_part(modality) || '//' || fs_part(bodysite),
                     modality_description || ' of ' || bodysite_description FROM v_imaging_studies
)
WHERE description IS NOT NULL AND code NOT LIKE '%//UNK'
ORDER BY code, description;

-- section: observations
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT CASE WHEN category = 'vital-signs' THEN 'VITAL' ELSE 'LAB' END || '//LOINC//' || fs_part(code_raw) AS code,
           description
    FROM v_observations
)
WHERE description IS NOT NULL AND code NOT LIKE '%//UNK'
ORDER BY code, description;
