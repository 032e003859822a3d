"""One shard of a load: keep the rows of the subjects whose stable shard hash is ``k`` of ``n``.

A sharded load (:mod:`foresight.warehouse.sharded`) runs the same load ``n`` times, each with ``shard=(k, n)``,
into its own warehouse file. Every shard reads every input row; :func:`set_aside_other_shards` then takes the rows
of other shards out of this shard's accounting entirely (not read, not loaded, not quarantined, not dropped), so
the shards' accounting adds up to the single-node load's, table by table:

- a validated row belongs to the shard of its subject: the subject of the events (or notes) it produced, else its
  ``subject_id`` column when that parses; a row with no valid subject belongs to shard 0;
- rows the CSV reader could not parse at all (quarantined by the scan, before any subject is known) belong to
  shard 0.

The shard hash is the split hash's neighbour: the split (:func:`foresight.schema.split_of`) takes bits 0-31 of
md5(decimal subject id), the shard takes bits 32-63, so a shard holds train, tuning and held-out subjects in the
split's proportions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import duckdb

from foresight.warehouse.results import TableResult

Keep = Callable[[str], str]

SHARD_MACRO = """
CREATE OR REPLACE TEMP MACRO fs_shard(subject_id, n) AS
    ('0x' || substr(md5(subject_id::VARCHAR), 9, 8))::UBIGINT % n::UBIGINT;
"""


def shard_of(subject_id: int, n: int) -> int:
    """The shard (0..n-1) of a subject; same rule as the ``fs_shard`` SQL macro.

    >>> shard_of(10000032, 4), shard_of(10001217, 4)
    (0, 1)
    """
    return int(hashlib.md5(str(subject_id).encode()).hexdigest()[8:16], 16) % n


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """``(k, n)`` with 0 <= k < n, as ints (ValueError otherwise)."""
    k, n = (int(x) for x in shard)
    if not 0 <= k < n:
        raise ValueError(f"shard {k} of {n}: need 0 <= k < n")
    return k, n


def set_aside_other_shards(con: duckdb.DuckDBPyConnection, table: str, v_cols: set[str], has_notes: bool,
                           shard: tuple[int, int], res: TableResult, n_optout: int, keep: Keep
                           ) -> tuple[int, Keep]:
    """Take the rows of ``table`` that belong to other shards out of this load's accounting (see module doc).

    Called by :meth:`foresight.warehouse.Load.finish_table` after the opt-out filter: builds TEMP
    ``offshard_lines``, lowers ``res.rows_read`` by them (and, for shards other than 0, forgets the rows the CSV
    reader quarantined), drops them from ``optout_lines`` and returns (opted-out lines of this shard, a ``keep``
    filter that also excludes other shards' lines).
    """
    k, n = check_shard(shard)
    con.execute(SHARD_MACRO)
    produced = [f"SELECT _line, subject_id FROM e_{table}"]
    if has_notes:
        produced.append(f"SELECT _line, subject_id FROM n_{table}")
    own = "TRY_CAST(v.subject_id AS BIGINT)" if "subject_id" in v_cols else "NULL::BIGINT"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE offshard_lines AS
        WITH p AS (SELECT _line, min(subject_id) AS subject_id FROM ({' UNION ALL '.join(produced)}) GROUP BY _line)
        SELECT v._line FROM v_{table} v LEFT JOIN p USING (_line)
        WHERE coalesce(fs_shard(coalesce(p.subject_id, {own}), {n}), 0) <> {k}
        """
    )
    res.rows_read -= con.execute("SELECT count(*) FROM offshard_lines").fetchall()[0][0]
    if k != 0:  # rows the reader could not parse have no subject: shard 0 counts them
        con.execute("DELETE FROM staged_quarantine WHERE source_table = ?", [table])
        res.rows_read -= res.rows_quarantined
        res.rows_quarantined = 0
    if n_optout:
        con.execute("DELETE FROM optout_lines WHERE _line IN (SELECT _line FROM offshard_lines)")
        n_optout = int(con.execute("SELECT count(*) FROM optout_lines").fetchall()[0][0])
    return n_optout, lambda alias: f"{keep(alias)} AND {alias}._line NOT IN (SELECT _line FROM offshard_lines)"
