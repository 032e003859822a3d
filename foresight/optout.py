"""The national data opt-out: a list of patients whose records must not be used, honoured at every stage.

A subjects file has one patient id per line (blank lines and ``#`` comments are ignored). An id is either
the warehouse ``subject_id`` of an integer-keyed source (MIMIC-IV ``subject_id``, a MEDS dataset's ids) or the
source id of a UUID-keyed patient (Synthea / FHIR ``Patient.id``), which maps to its warehouse id through the same
stable hash the sources use (:func:`foresight.schema.uuid_subject_id`). So one list works for every source.

Where it is honoured:

- **ETL**: :class:`foresight.warehouse.Load` drops every row of a listed subject with the reason
  :data:`OPT_OUT_REASON` (counted, so read = loaded + quarantined + dropped still holds). Their invalid rows are
  dropped too, not quarantined: quarantine keeps the raw row, which would keep their data.
- **Tokenize**: :func:`foresight.tokens.tokenize` (``exclude_subjects``) hides listed subjects from every
  query, so a warehouse loaded before the patient opted out yields no vocabulary counts, codes or tokens for them.
- **Audit**: ``privacy.audit`` can check a *forgotten* set with the same membership inference (members = the
  forgotten subjects, non-members = held-out subjects neither model ever saw).

The list itself is never copied into an artifact: what is recorded is how many subjects it excluded and the
sha256 of the resolved id set (:func:`digest`), so a release can prove which list it honoured without naming
anybody on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from foresight.hashing import sha256
from foresight.schema import uuid_subject_id

OPT_OUT_REASON = "national data opt-out"


class OptOutError(ValueError):
    """The subjects file cannot be read; the message names the file and line."""


def resolve_id(raw: str) -> int:
    """The warehouse subject id of one listed patient id (integer ids as they are, other ids via the UUID hash).

    >>> resolve_id("10000032")
    10000032
    >>> from foresight.schema import uuid_subject_id
    >>> resolve_id(" 593AAA05-D864-1DF7-5B96-155FBDB19F28 ") == uuid_subject_id("593aaa05-d864-1df7-5b96-155fbdb19f28")
    True
    """
    text = raw.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return uuid_subject_id(text)


def read_subjects_file(path: str | Path) -> set[int]:
    """The warehouse subject ids listed in ``path`` (one id per line; ``#`` starts a comment)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptOutError(f"{path}: cannot read the opt-out subjects file: {exc}") from exc
    out: set[int] = set()
    for n, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if any(c.isspace() for c in text) or "," in text:
            raise OptOutError(f"{path}: line {n}: expected one patient id per line, got {line!r}")
        out.add(resolve_id(text))
    return out


def digest(subject_ids: Iterable[int]) -> str:
    """sha256 of the sorted id set: records WHICH list was honoured without storing the ids."""
    return sha256(",".join(str(s) for s in sorted(set(subject_ids))))


def hide_subjects(con: Any, subject_ids: Iterable[int]) -> int:
    """Make the listed subjects invisible to every later query on ``con`` (works on read-only connections).

    TEMP views named ``events``, ``subject_splits`` and ``notes`` shadow the warehouse tables (DuckDB resolves
    the temporary catalog first), each filtered to subjects not in the list, so code written against the
    warehouse tables (the tokenizer's many queries) honours the opt-out without knowing about it. Returns how
    many listed subjects had events.
    """
    ids = sorted(set(int(s) for s in subject_ids))
    db = con.execute("SELECT current_database()").fetchall()[0][0]
    con.execute("CREATE OR REPLACE TEMP TABLE fs_hidden_subjects (subject_id BIGINT PRIMARY KEY)")
    if ids:
        con.execute("INSERT INTO fs_hidden_subjects SELECT unnest(?::BIGINT[])", [ids])
    present = con.execute(
        f'SELECT count(DISTINCT subject_id) FROM "{db}".main.events '
        "WHERE subject_id IN (SELECT subject_id FROM fs_hidden_subjects)").fetchall()[0][0]
    for table in ("events", "subject_splits", "notes"):
        exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
                             "AND table_name = ?", [db, table]).fetchall()[0][0]
        if exists:
            con.execute(f'CREATE OR REPLACE TEMP VIEW {table} AS SELECT * FROM "{db}".main.{table} '
                        "WHERE subject_id NOT IN (SELECT subject_id FROM fs_hidden_subjects)")
    return int(present)
