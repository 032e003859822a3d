"""Find the warehouse a token folder was made from: the one its tokenize summary records, else the one whose data
fingerprint matches the vocabulary's."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from foresight import warehouse
from foresight.tokens import data_fingerprint


def warehouse_fingerprint(db: Path, opt_out_sha256: str | None) -> str | None:
    """The tokenizer's data fingerprint of warehouse ``db``, or None if it is no warehouse."""
    try:
        with warehouse.connect(db, read_only=True) as con:
            return data_fingerprint(con, opt_out_sha256)
    except duckdb.Error:
        return None


def locate_warehouse(data_dir: str | Path) -> tuple[Path | None, str]:
    """The warehouse that ``data_dir`` was tokenized from, and how it was found; (None, why not) otherwise.

    ``foresight tokenize`` records the warehouse in ``tokenize_summary.json`` (``db``). Token folders written
    before it did, or whose warehouse has moved, are matched by their data fingerprint (``vocab.json``: the
    warehouse's ETL run history) against the ``*.duckdb`` files in the folder and next to it, so a different
    warehouse is never picked by its name.
    """
    data_dir = Path(data_dir)
    summary, vocab_path = data_dir / "tokenize_summary.json", data_dir / "vocab.json"
    recorded = None
    if summary.exists():
        try:
            recorded = json.loads(summary.read_text()).get("db")
        except (OSError, ValueError) as exc:
            return None, f"{summary}: unreadable ({exc})"
    expected = opt_out = None
    if vocab_path.exists():
        try:
            vocab = json.loads(vocab_path.read_text())
            expected = vocab.get("fingerprint") or None
            opt_out = (vocab.get("report", {}).get("opt_out") or {}).get("list_sha256")
        except (OSError, ValueError) as exc:
            return None, f"{vocab_path}: unreadable ({exc})"
    if recorded and Path(recorded).exists():
        db = Path(recorded)
        how = f"recorded in {summary}"
        if expected and warehouse_fingerprint(db, opt_out) not in (None, expected):
            how += ("; its load history changed since the tokens were made, so labels come from the warehouse as "
                    "it is now")
        return db, how
    if recorded:
        where = f"{recorded} (recorded in {summary}) does not exist"
    else:
        where = f"{summary} records none" if summary.exists() else f"{summary} is missing"
    if expected:
        for cand in sorted({*data_dir.glob("*.duckdb"), *data_dir.parent.glob("*.duckdb")}):
            if warehouse_fingerprint(cand, opt_out) == expected:
                return cand, f"{where}; found by the data fingerprint of {vocab_path}"
    return None, (f"{where}, and no *.duckdb in {data_dir} or next to it has the data fingerprint of "
                  f"{vocab_path} (pass --db)")

