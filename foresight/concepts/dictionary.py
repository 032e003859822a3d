"""Stage 1: code dictionaries -> MedCAT's concept table, and concept -> Foresight code.

:func:`read_dictionary` reads MedCAT's own concept CSV as is, and recognises by their header the dictionaries a
Foresight user already has: the ICD-10-CM order file (``code,billable,short,long``), MIMIC-IV's
``d_icd_diagnoses`` / ``d_icd_procedures`` (``icd_code,icd_version,long_title``) and the tables of a Synthea CSV
export (``CODE,DESCRIPTION``; the vocabulary from ``SYSTEM`` or the file name). Names are prepared for matching
text (:func:`name_variants`). :func:`concept_code` turns a cui of a loaded pack into ``NOTE//<VOCAB>//<CODE>``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from foresight.concepts.base import PackError
from foresight.schema import code_part, make_code

if TYPE_CHECKING:  # medcat and pandas cost seconds at import; only the functions that use them import them
    import pandas as pd
    from medcat.cat import CAT

CONCEPT_COLUMNS = ("cui", "name", "ontologies", "name_status", "type_ids", "description")


# --- vocabularies --------------------------------------------------------------------------------------------

# Ontology names as dictionaries and MedCAT packs spell them -> the VOCAB part of a Foresight code.
VOCAB_ALIASES = {
    "SNOMED": "SNOMED", "SNOMED-CT": "SNOMED", "SNOMEDCT": "SNOMED", "SNOMEDCT_US": "SNOMED", "SNOMED_CT": "SNOMED",
    "SNOMED CT": "SNOMED", "SCT": "SNOMED", "HTTP://SNOMED.INFO/SCT": "SNOMED",
    "ICD10CM": "ICD10CM", "ICD-10-CM": "ICD10CM", "ICD10": "ICD10CM", "ICD-10": "ICD10CM",
    "ICD9CM": "ICD9CM", "ICD-9-CM": "ICD9CM", "ICD9": "ICD9CM", "ICD10PCS": "ICD10PCS", "ICD9PROC": "ICD9PROC",
    "RXNORM": "RXNORM", "LOINC": "LOINC", "CVX": "CVX", "UMLS": "UMLS", "ATC": "ATC", "OPCS4": "OPCS4",
    "HTTP://WWW.NLM.NIH.GOV/RESEARCH/UMLS/RXNORM": "RXNORM", "HTTP://LOINC.ORG": "LOINC",
    "HTTP://HL7.ORG/FHIR/SID/CVX": "CVX", "HTTP://HL7.ORG/FHIR/SID/ICD-10-CM": "ICD10CM",
}
_UMLS_CUI = re.compile(r"^C\d{7}$")


def vocab_name(ontology: str) -> str:
    """The Foresight VOCAB for an ontology name (``SNOMED-CT`` -> ``SNOMED``); unknown names pass through
    normalised like any code part.

    >>> vocab_name("snomedct_us"), vocab_name("ICD-10-CM"), vocab_name("my terms")
    ('SNOMED', 'ICD10CM', 'MY_TERMS')
    """
    key = ontology.strip().upper()
    return VOCAB_ALIASES.get(key, code_part(key))


def concept_code(cat: CAT, cui: str, vocab_override: str | None = None) -> str:
    """The ``NOTE//<VOCAB>//<CODE>`` code of a MedCAT concept.

    The vocabulary, first rule that applies: ``vocab_override``; a cui written ``VOCAB:CODE`` (packs built here
    from dictionaries that mix vocabularies, where the same code could exist in two); ``UMLS`` for a UMLS-shaped
    cui (C0011849; no ICD or SNOMED code has that shape); the pack's single ``config.meta.ontology`` (set by
    :func:`build_pack`, and by most MedCAT packs); the concept's single ontology in the CDB; else ``CUI``.
    """
    if vocab_override:
        return make_code("NOTE", vocab_name(vocab_override), cui)
    info = cat.cdb.cui2info.get(cui)
    own = sorted(info.get("in_other_ontology") or ()) if info else []
    head, sep, tail = cui.partition(":")
    if sep and (head in VOCAB_ALIASES.values() or head in own):
        return make_code("NOTE", head, tail)
    if _UMLS_CUI.match(cui):
        return make_code("NOTE", "UMLS", cui)
    ontologies = [o for o in (cat.config.meta.ontology or []) if o]
    if len(ontologies) == 1:
        return make_code("NOTE", vocab_name(ontologies[0]), cui)
    if len(own) == 1:
        return make_code("NOTE", vocab_name(own[0]), cui)
    return make_code("NOTE", "CUI", cui)


# --- dictionaries --------------------------------------------------------------------------------------------

# Synthea CSV tables -> vocabulary of their CODE column (used when the table has no SYSTEM column).
SYNTHEA_VOCABS = {
    "conditions": "SNOMED", "procedures": "SNOMED", "allergies": "SNOMED", "careplans": "SNOMED",
    "devices": "SNOMED", "encounters": "SNOMED", "supplies": "SNOMED", "medications": "RXNORM",
    "immunizations": "CVX", "observations": "LOINC",
}
SNOMED_TAGS = (
    "disorder", "finding", "situation", "procedure", "person", "morphologic abnormality", "observable entity",
    "event", "regime/therapy", "qualifier value", "body structure", "substance", "product", "medicinal product",
    "clinical drug", "record artifact", "environment", "organism", "physical object", "social concept",
    "attribute", "assessment scale", "occupation", "specimen", "navigational concept", "life style",
)
_TAG = re.compile(r"\s*\((?:" + "|".join(re.escape(t) for t in SNOMED_TAGS) + r")\)?\s*$", re.IGNORECASE)
_QUALIFIERS = re.compile(
    r",?\s*\b(?:unspecified|not elsewhere classified|not otherwise specified|NEC|NOS)\b\s*(?=,|$)"
    r"|,\s*unspecified(?:\s+\w+){1,2}\s*$"  # "Pneumonia, unspecified organism", "..., unspecified site"
    r"|^\s*unspecified\s+", re.IGNORECASE)
_PARENS = re.compile(r"\s*\([^()]*\)")


def name_variants(name: str) -> list[str]:
    """A dictionary title and the synonyms derived from it, original first.

    >>> name_variants("Sinusitis (disorder)")
    ['Sinusitis (disorder)', 'Sinusitis']
    >>> name_variants("Essential (primary) hypertension")
    ['Essential (primary) hypertension', 'Essential hypertension']
    >>> name_variants("Cholera, unspecified")
    ['Cholera, unspecified', 'Cholera']
    >>> name_variants("Pneumonia, unspecified organism")[-1]
    'Pneumonia'
    >>> name_variants("Severe anxiety (panic) (finding")
    ['Severe anxiety (panic) (finding', 'Severe anxiety (panic)', 'Severe anxiety']
    """
    out = [" ".join(name.split())]
    current = out[0]
    for rule in (_TAG, _QUALIFIERS, _PARENS):
        current = " ".join(rule.sub("", current).split()).strip(" ,;-")
        if current and current not in out:
            out.append(current)
    return out


def _key(name: str) -> str:
    # Close to how MedCAT joins a name's tokens: case and punctuation do not distinguish two names.
    return " ".join(re.findall(r"[a-z0-9]+", name.lower()))


def _read_table(path: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    try:
        with duckdb.connect() as con:
            rel = con.sql("SELECT * FROM read_csv($p, all_varchar = true, header = true, auto_detect = true)",
                          params={"p": str(path)})
            return [c.lower() for c in rel.columns], rel.fetchall()
    except duckdb.Error as exc:
        raise PackError(f"{path}: cannot be read as a CSV dictionary: {exc}") from exc


def read_dictionary(path: str | Path) -> pd.DataFrame:
    """Read a code dictionary into MedCAT's concept table (one row per cui and name).

    Formats, recognised by the header: MedCAT concept CSV (``cui,name`` and optional ``ontologies,name_status,
    type_ids,description``; a cui may repeat, names may be ``|``-separated, used as given); ICD-10-CM order file
    (``code,billable,short,long``); MIMIC-IV ``d_icd_diagnoses``/``d_icd_procedures``; Synthea CSV tables
    (``CODE,DESCRIPTION``). For the code dictionaries the title becomes the primary name (status ``P``), other
    titles and :func:`name_variants` synonyms (status ``A``); ``ontologies`` holds the vocabulary.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: dictionary not found")
    cols, rows = _read_table(path)
    idx = {c: i for i, c in enumerate(cols)}
    if {"cui", "name"} <= idx.keys():
        # MedCAT's own format: keep it exactly as the user wrote it.
        data = {c: [("" if r[idx[c]] is None else r[idx[c]]) for r in rows] if c in idx else [""] * len(rows)
                for c in CONCEPT_COLUMNS}
        return pd.DataFrame(data, columns=list(CONCEPT_COLUMNS))

    titles: list[tuple[str, str, list[str]]] = []  # (vocab, code, [titles, primary first])
    stem = path.name.lower().split(".")[0]
    if {"code", "short", "long"} <= idx.keys():
        titles = [("ICD10CM", r[idx["code"]], [r[idx["long"]], r[idx["short"]]]) for r in rows]
    elif {"icd_code", "icd_version", "long_title"} <= idx.keys():
        proc = "procedure" in stem
        for r in rows:
            v9 = (r[idx["icd_version"]] or "").strip() == "9"
            vocab = ("ICD9PROC" if v9 else "ICD10PCS") if proc else ("ICD9CM" if v9 else "ICD10CM")
            titles.append((vocab, r[idx["icd_code"]], [r[idx["long_title"]]]))
    elif {"code", "description"} <= idx.keys():
        default = SYNTHEA_VOCABS.get(stem)
        for r in rows:
            system = r[idx["system"]] if "system" in idx else None
            vocab = vocab_name(system) if system else default
            if vocab is None:
                raise PackError(f"{path}: a CODE,DESCRIPTION table but no SYSTEM column and the file name is not a "
                                f"Synthea table ({', '.join(sorted(SYNTHEA_VOCABS))}); write a MedCAT concept CSV "
                                "(cui,name,ontologies) instead")
            titles.append((code_part(vocab), r[idx["code"]], [r[idx["description"]]]))
    else:
        raise PackError(f"{path}: unknown dictionary format (header {cols}); expected a MedCAT concept CSV (cui,name"
                        ",...), the ICD-10-CM order file (code,billable,short,long), MIMIC d_icd_* (icd_code,"
                        "icd_version,long_title) or a Synthea table (CODE,DESCRIPTION)")
    return _concept_table(titles)


def _concept_table(titles: Sequence[tuple[str, str, list[str]]]) -> pd.DataFrame:
    """Concept rows from (vocab, code, titles): every title and its variants, derived names only where no other
    concept has that name as a title (so "Cholera, unspecified" -> "Cholera" does not make the category A00's own
    title ambiguous)."""
    import pandas as pd

    owned: dict[str, set[str]] = defaultdict(set)  # name key -> cuis holding it as a dictionary title
    concepts: dict[str, tuple[str, list[str]]] = {}
    for vocab, code, names in titles:
        code = (code or "").strip()
        names = [n.strip() for n in names if n and n.strip()]
        if not code or not names:
            continue
        cui = f"{vocab}:{code}"
        prev = concepts.get(cui, (vocab, []))[1]
        concepts[cui] = (vocab, prev + [n for n in names if n not in prev])
        for n in names:
            owned[_key(n)].add(cui)
    rows = []
    for cui, (vocab, names) in concepts.items():
        seen: set[str] = set()
        for i, title in enumerate(names):
            for j, variant in enumerate(name_variants(title)):
                k = _key(variant)
                if not k or k in seen or (j > 0 and owned.get(k, {cui}) - {cui}):
                    continue
                seen.add(k)
                status = "P" if i == 0 and j == 0 else "A"
                rows.append((cui, variant, vocab, status, "", names[0]))
    return pd.DataFrame(rows, columns=list(CONCEPT_COLUMNS))


def finalise_cuis(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Code-dictionary rows carry ``VOCAB:CODE`` cuis; when the whole pack has one vocabulary the prefix goes
    (cuis are then the codes themselves, as in a SNOMED or ICD pack from elsewhere) and the vocabulary is the pack's
    ``meta.ontology``. MedCAT-format rows keep their cuis."""
    ontologies = sorted({o for cell in df["ontologies"] for o in str(cell).split("|") if o.strip()})
    if len(ontologies) == 1:
        prefix = ontologies[0] + ":"
        df = df.copy()
        df["cui"] = [c[len(prefix):] if c.startswith(prefix) else c for c in df["cui"]]
    return df, ontologies


