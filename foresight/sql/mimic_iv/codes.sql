-- Code descriptions and hierarchies for MIMIC-IV codes. Each section selects (code, description,
-- parent_codes): `-- section: <d_* table>` sections read that dictionary file bound as $path;
-- `-- section: <group> (...)` sections take the names carried by that table group's own rows and run right
-- after the group is staged. Only codes that occur in the load (and their parents) reach `codes`.

-- section: d_icd_diagnoses
SELECT 'DX//ICD' || trim(icd_version) || 'CM//' || upper(trim(icd_code)) AS code, long_title AS description,
       fs_prefixes('DX//ICD' || trim(icd_version) || 'CM//', upper(trim(icd_code)),
                   CASE WHEN trim(icd_version) = '9' AND upper(trim(icd_code)) LIKE 'E%' THEN 4 ELSE 3 END)
           AS parent_codes
FROM read_csv($path, header = true, auto_detect = false,
              columns = {'icd_code': 'VARCHAR', 'icd_version': 'VARCHAR', 'long_title': 'VARCHAR'})
WHERE icd_code IS NOT NULL AND trim(icd_version) IN ('9', '10');

-- section: d_icd_procedures
SELECT CASE trim(icd_version) WHEN '9' THEN 'PX//ICD9PROC//' ELSE 'PX//ICD10PCS//' END || upper(trim(icd_code)),
       long_title,
       fs_prefixes(CASE trim(icd_version) WHEN '9' THEN 'PX//ICD9PROC//' ELSE 'PX//ICD10PCS//' END,
                   upper(trim(icd_code)), CASE trim(icd_version) WHEN '9' THEN 2 ELSE 3 END)
FROM read_csv($path, header = true, auto_detect = false,
              columns = {'icd_code': 'VARCHAR', 'icd_version': 'VARCHAR', 'long_title': 'VARCHAR'})
WHERE icd_code IS NOT NULL AND trim(icd_version) IN ('9', '10');

-- section: d_labitems
SELECT 'LAB//MIMIC//' || trim(itemid), label || ' (' || coalesce(fluid, '?') || ', ' || coalesce(category, '?') || ')',
       []::VARCHAR[]
FROM read_csv($path, all_varchar = true)
WHERE fs_id(itemid) IS NOT NULL;

-- section: d_hcpcs
SELECT 'PX//HCPCS//' || fs_part(code), coalesce(long_description, short_description), []::VARCHAR[]
FROM read_csv($path, header = true, auto_detect = false, columns = {'code': 'VARCHAR', 'category': 'VARCHAR',
              'long_description': 'VARCHAR', 'short_description': 'VARCHAR'})
WHERE code IS NOT NULL;

-- section: d_items
SELECT k.kind || '//MIMIC//' || trim(d.itemid), d.label || k.suffix, []::VARCHAR[]
FROM read_csv($path, all_varchar = true) d
CROSS JOIN (VALUES ('INPUT_START', ' (start)'), ('INPUT_END', ' (end, amount given)'), ('OUTPUT', ''),
                   ('PX', ''), ('PX_END', ' (end)'), ('DATETIME', ''), ('CHART', '')) k(kind, suffix)
WHERE fs_id(d.itemid) IS NOT NULL;

-- section: medications (drug names as written in the orders)
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT kind || '//DRUG//' || fs_part(name) AS code,
           coalesce(name, '(drug name missing in the source)') || suffix AS description
    FROM (
        SELECT drug AS name FROM v_prescriptions UNION ALL SELECT medication FROM v_pharmacy
    ) CROSS JOIN (VALUES ('RX_START', ''), ('RX_STOP', ' (stop)')) k(kind, suffix)
    UNION ALL
    SELECT 'RX_ADMIN//DRUG//' || fs_part(medication),
           coalesce(medication, '(drug name missing in the source)') || ' (given)'
    FROM v_emar
)
ORDER BY code, description;

-- section: labs (microbiology test, organism and antibiotic names; outpatient measurement names)
SELECT DISTINCT ON (code) code, description, []::VARCHAR[]
FROM (
    SELECT 'MICRO//TEST//' || fs_id(test_itemid) AS code, test_name AS description FROM v_microbiologyevents
    UNION ALL SELECT 'MICRO//ORG//' || fs_id(org_itemid), org_name FROM v_microbiologyevents
    UNION ALL SELECT 'MICRO//SUSC//' || fs_id(ab_itemid), ab_name || ' susceptibility' FROM v_microbiologyevents
    UNION ALL SELECT 'VITAL//OMR//' || fs_part(result_name), result_name FROM v_omr
)
WHERE code IS NOT NULL AND description IS NOT NULL
ORDER BY code, description;

-- section: coding (DRG titles)
SELECT DISTINCT ON (code) code, text_value, []::VARCHAR[]
FROM e_drgcodes
WHERE text_value IS NOT NULL
ORDER BY code, text_value;
