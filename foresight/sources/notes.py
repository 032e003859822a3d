"""Free-text clinical notes -> ``NOTE//<VOCAB>//<CODE>`` events, with a MedCAT model pack.

Input (``--input``), one of:

- a CSV (``.csv``, ``.csv.gz``) or parquet file, one note per row: ``subject_id``, ``text`` and a time column
  (``time``, else ``charttime``, ``chartdate`` or ``date``); optional ``note_id`` (or ``row_id``),
  ``encounter_id`` (or ``hadm_id``) and ``note_type``; other columns are ignored (and reported);
- a DuckDB warehouse file: its ``notes`` table, i.e. FHIR DocumentReference text loaded by ``foresight etl fhir``.
  Usually that is the ``--db`` warehouse itself (``--input`` and ``--db`` the same file); another warehouse file
  is attached read-only. Reading the loaded table, rather than re-reading the bundles, keeps one FHIR reader and
  its accounting in one place, and the notes arrive with subject ids, leak-free times and encounters resolved.

Every row is accounted for (read = loaded + quarantined + dropped, :mod:`foresight.warehouse`): quarantined with
its reason when its subject is unknown to the warehouse (no events from another source: load the structured
data first; non-integer ids are looked up in ``subject_map``), its time is missing or unparseable or before
birth, its text is not valid UTF-8 (the CSV reader quarantines such rows; parquet BLOB text is checked here)
or longer than ``FORESIGHT_NOTES_MAX_CHARS`` (default 5,000,000 characters; longer notes are still annotated in
chunks); dropped with its reason when empty ("empty note"), a duplicate, without any concept ("no concept
found") or with only negated, hypothetical or family mentions. A note that yields at least one event is loaded.

Annotation (Python, :func:`foresight.concepts.annotate`) runs between two SQL sections
(``foresight/sql/notes/notes.sql``): ``validate`` decides which notes are annotated, MedCAT's mentions are
staged into the TEMP table ``note_mentions`` in pages, and ``events`` makes one event per (note, concept) and the
drop reasons. The model pack comes from ``model_pack=`` (CLI ``--model-pack``) or ``$FORESIGHT_MODEL_PACK`` (how
the Prefect ``etl`` flow, which passes only the input path, finds it); its file checksum is part of the run's
lineage (``etl_runs.input_checksums``) next to the input's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb

from foresight import sql
from foresight.concepts import PackError, annotate, is_duckdb_file, load_pack, pack_fingerprint
from foresight.sources.base import Group
from foresight.warehouse import CsvScan, Load, SourceError, read_header, sql_literal

SOURCE_KIND = "notes"
TABLE = "notes"
REQUIRED = ("subject_id", "text")
TIME_COLUMNS = ("time", "charttime", "chartdate", "date")
OPTIONAL = (*TIME_COLUMNS, "note_id", "row_id", "encounter_id", "hadm_id", "note_type")
RAW_COLUMNS = (*REQUIRED, *OPTIONAL)
DEFAULT_MAX_CHARS = 5_000_000
PAGE_NOTES = 500  # notes fetched, annotated and staged per page (memory stays flat on any corpus)
FLUSH_MENTIONS = 50_000  # mentions buffered before they are inserted into note_mentions
MENTION_COLUMNS = ("_line", "cui", "code", "description", "status", "start_char", "end_char", "mention",
                   "similarity")
# Notes left to annotate: valid, not dropped, and not of an opted-out subject (finish_table drops their rows with
# that reason; they are never annotated at all).
TODO = "_quarantine IS NULL AND _drop IS NULL AND NOT list_contains($optout, subject_id)"

GROUPS: tuple[Group, ...] = (Group("notes", (TABLE,)),)

ProgressFn = Callable[[int, int], None]


def check_input(path: Path) -> Path:
    """The notes file; ``SourceError`` naming the path when it is not a CSV, parquet or DuckDB warehouse file."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: not a file (expected a CSV/parquet of notes or a DuckDB warehouse with notes)")
    name = path.name.lower()
    if not (name.endswith((".csv", ".csv.gz", ".parquet")) or is_duckdb_file(path)):
        raise SourceError(f"{path}: not a notes file: expected .csv, .csv.gz, .parquet or a DuckDB warehouse file")
    return path


def _max_chars() -> int:
    return int(os.environ.get("FORESIGHT_NOTES_MAX_CHARS", DEFAULT_MAX_CHARS))


@lru_cache(maxsize=2)
def _cached_pack(path: str, mtime: float) -> Any:
    return load_pack(path)


def _pack(model_pack: str | Path | None) -> tuple[Path, Any]:
    raw = model_pack or os.environ.get("FORESIGHT_MODEL_PACK")
    if not raw:
        raise SourceError("notes need a MedCAT model pack: pass --model-pack PATH (or set FORESIGHT_MODEL_PACK); "
                          "build one with `foresight concepts build`")
    path = Path(raw)
    try:
        return path, _cached_pack(str(path.resolve()), path.stat().st_mtime if path.exists() else 0.0)
    except PackError as exc:
        raise SourceError(str(exc)) from exc


def _db_path(con: duckdb.DuckDBPyConnection) -> Path | None:
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    return Path(row[0][0]).resolve() if row and row[0][0] else None


def _stage_raw(load: Load, path: Path) -> None:
    """Stage ``fs_stage.raw_notes`` with every column of RAW_COLUMNS (VARCHAR) plus ``_text_error``."""
    con = load.con
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        header = read_header(path, allow_empty=True)
        if not any(c in header for c in TIME_COLUMNS):
            raise SourceError(f"{path}: no time column (one of {', '.join(TIME_COLUMNS)}); header has {header}")
        load.read_csv(TABLE, path, REQUIRED, optional_columns=OPTIONAL)
        con.execute(f"ALTER TABLE fs_stage.raw_{TABLE} ADD COLUMN _text_error VARCHAR")
        return
    if name.endswith(".parquet"):
        _stage_parquet(load, path)
        return
    _stage_warehouse(load, path)


def _stage_parquet(load: Load, path: Path) -> None:
    con = load.con
    src = sql_literal(str(path))
    try:
        schema = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({src})").fetchall()}
    except duckdb.Error as exc:
        raise SourceError(f"{path}: cannot be read as parquet: {exc}") from exc
    missing = [c for c in REQUIRED if c not in schema]
    if missing or not any(c in schema for c in TIME_COLUMNS):
        raise SourceError(f"{path}: missing required column(s) {missing or list(TIME_COLUMNS)}; has {list(schema)}")
    cols = []
    for c in RAW_COLUMNS:
        if c not in schema:
            cols.append(f'NULL::VARCHAR AS "{c}"')
        elif c == "text" and schema[c] == "BLOB":
            # Bytes that are not UTF-8 stay visible (escaped) in the quarantine; valid ones are decoded.
            cols.append('coalesce(TRY(decode("text")), "text"::VARCHAR) AS "text"')
        else:
            cols.append(f'"{c}"::VARCHAR AS "{c}"')
    text_error = ("CASE WHEN \"text\" IS NOT NULL AND TRY(decode(\"text\")) IS NULL THEN 'text is not valid UTF-8' END"
                  if schema["text"] == "BLOB" else "NULL::VARCHAR")
    con.execute(f"CREATE OR REPLACE TABLE fs_stage.raw_{TABLE} AS SELECT row_number() OVER () AS _line, "
                f"{', '.join(cols)}, {text_error} AS _text_error FROM read_parquet({src})")
    rows = con.execute(f"SELECT count(*) FROM fs_stage.raw_{TABLE}").fetchall()[0][0]
    load.register_scan(CsvScan(TABLE, load.relpath(path), load.checksum(path), rows, [], []))


def _stage_warehouse(load: Load, path: Path) -> None:
    """The ``notes`` table of a warehouse (this one, or another file attached read-only), other sources' rows."""
    con = load.con
    same = _db_path(con) == path.resolve()
    if not same:
        con.execute(f"ATTACH {sql_literal(str(path))} AS fs_notes_src (READ_ONLY)")
    table = "notes" if same else "fs_notes_src.notes"
    try:
        cols = ", ".join(
            f'"{c}"::VARCHAR AS "{c}"' if c in ("subject_id", "time", "text", "note_id", "encounter_id", "note_type")
            else f'NULL::VARCHAR AS "{c}"' for c in RAW_COLUMNS)
        con.execute(
            f"""CREATE OR REPLACE TABLE fs_stage.raw_{TABLE} AS
                SELECT row_number() OVER (ORDER BY source, subject_id, time, note_id) AS _line, {cols},
                       NULL::VARCHAR AS _text_error
                FROM {table} WHERE source <> $source""",
            {"source": load.source},
        )
    except duckdb.Error as exc:
        raise SourceError(f"{path}: no readable `notes` table (load FHIR bundles with `foresight etl fhir` first): "
                          f"{exc}") from exc
    finally:
        if not same:
            con.execute("DETACH fs_notes_src")
    rows, digest = con.execute(
        f"SELECT count(*), coalesce(sha256(string_agg(note_id || ':' || md5(text), ',' ORDER BY _line)), '') "
        f"FROM fs_stage.raw_{TABLE}").fetchall()[0]
    file = f"{path.name} (table notes)"
    load.checksums[file] = digest
    load.register_scan(CsvScan(TABLE, file, digest, rows, [], []))


def stage_group(
    load: Load,
    root: Path,
    group: Group,
    *,
    model_pack: str | Path | None = None,
    n_process: int = 1,
    history_days: float = 1.0,
    vocab: str | None = None,
    progress: ProgressFn | None = None,
) -> list[str]:
    """Stage the notes: validate, annotate with the model pack, build the events. Safe to call again after a
    failure (the table's staging is reset first)."""
    pack_path, cat = _pack(model_pack)
    con = load.con
    sections = sql.sections("notes", "notes")
    _stage_raw(load, root)
    load.checksums[f"model pack {pack_path.name}"] = pack_fingerprint(pack_path)
    con.execute("CREATE OR REPLACE TEMP TABLE fs_notes_load AS SELECT $source::VARCHAR AS source, "
                "$max_chars::BIGINT AS max_chars, $history::BIGINT AS history_seconds",
                {"source": load.source, "max_chars": _max_chars(), "history": round(history_days * 86400)})
    con.execute(sections["validate"])
    _stage_mentions(load, cat, pack_path, n_process=n_process, vocab=vocab, progress=progress)
    con.execute(sections["events"])
    load.finish_table(TABLE)
    load.add_codes("SELECT code, min(description), []::VARCHAR[] FROM note_concepts GROUP BY code")
    load.drop_staging([TABLE])
    con.execute("DROP TABLE IF EXISTS note_concepts; DROP TABLE IF EXISTS notes_known; "
                "DROP TABLE IF EXISTS notes_idmap; DROP TABLE IF EXISTS notes_birth")
    return [TABLE]


def _pages(con: duckdb.DuckDBPyConnection, optout: list[int]) -> Iterator[tuple[str, str]]:
    """(line, text) of the notes to annotate, in ``_line`` order. Keyset pages, each fetched completely: the
    results of earlier pages are inserted on this same connection between fetches (the generator is suspended
    then), and one worker pool serves every page."""
    last = -1
    while page := con.execute(f"SELECT _line, text FROM v_notes WHERE {TODO} AND _line > $last ORDER BY _line "
                              "LIMIT $n", {"optout": optout, "last": last, "n": PAGE_NOTES}).fetchall():
        last = page[-1][0]
        yield from ((str(line), text) for line, text in page)


def _insert_mentions(con: duckdb.DuckDBPyConnection, rows: dict[str, list[Any]]) -> None:
    """Append the buffered mention columns to ``note_mentions`` and empty the buffer."""
    import pyarrow as pa

    if not rows["_line"]:
        return
    con.register("fs_page_mentions", pa.table(rows))
    try:
        con.execute("INSERT INTO note_mentions SELECT * FROM fs_page_mentions")
    finally:
        con.unregister("fs_page_mentions")
    for v in rows.values():
        v.clear()


def _stage_mentions(load: Load, cat: Any, pack_path: Path, *, n_process: int, vocab: str | None,
                    progress: ProgressFn | None) -> None:
    """Annotate the notes ``validate`` left to annotate and stage their mentions in the TEMP table
    ``note_mentions``, in pages (memory stays flat on any corpus)."""
    con = load.con
    con.execute("""CREATE OR REPLACE TEMP TABLE note_mentions (_line BIGINT, cui VARCHAR, code VARCHAR,
                   description VARCHAR, status VARCHAR, start_char INTEGER, end_char INTEGER, mention VARCHAR,
                   similarity DOUBLE)""")
    optout = sorted(load.excluded_subjects)
    total = con.execute(f"SELECT count(*) FROM v_notes WHERE {TODO}", {"optout": optout}).fetchall()[0][0]
    rows: dict[str, list[Any]] = {k: [] for k in MENTION_COLUMNS}
    notes = annotate(cat, _pages(con, optout), n_process=n_process, vocab=vocab, pack_path=pack_path)
    for done, (note_id, mentions) in enumerate(notes, 1):
        for m in mentions:
            for k, v in zip(MENTION_COLUMNS, (int(note_id), m.cui, m.code, m.name, m.status, m.start, m.end, m.text,
                                              m.similarity), strict=True):
                rows[k].append(v)
        if len(rows["_line"]) >= FLUSH_MENTIONS:
            _insert_mentions(con, rows)
        if progress:
            progress(done, total)
    _insert_mentions(con, rows)


def stage_codes(load: Load, root: Path) -> None:
    """Descriptions (the concepts' preferred names) are staged with the notes group."""


def mention_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Mentions of the last staged load on this connection, by context status (current, historical, negated,
    hypothetical, family); empty if none."""
    try:
        return dict(con.execute("SELECT status, count(*) FROM note_mentions GROUP BY 1 ORDER BY 1").fetchall())
    except duckdb.CatalogException:
        return {}
