"""Embedding commands: ``embed`` (patient vectors and a similar-patient index) and ``similar`` (a subject's
nearest neighbours and their aggregate profile).

:mod:`foresight.embed` imports torch: it is imported when one of these commands runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from foresight import warehouse
from foresight.cli.app import ExcludeOption, JsonOption, emit, err, fail, opt_out_list, parse_time
from foresight.schema import SPLITS
from foresight.suppression import SuppressionRule


def embed(
    model: Annotated[Path, typer.Option("--model", help="Trained model directory.")],
    db: Annotated[Path, typer.Option("--db", help="Warehouse holding the cohort.")],
    out: Annotated[Path, typer.Option("--out", help="Index folder: embeddings.parquet, futures.parquet, the search "
                                                    "index and index.json.")],
    split: Annotated[str | None, typer.Option(help="Only subjects of this split (train, tuning, held_out).")] = None,
    as_of: Annotated[str | None, typer.Option(
        "--as-of", help="Cut every timeline here (default: --horizon-days before the warehouse's last event, so "
                        "each subject has an observed future for the neighbour profile).")] = None,
    pooling: Annotated[str, typer.Option(help="last (the last token's state), mean (over the history) or both "
                                              "(concatenated).")] = "last",
    horizon_days: Annotated[float, typer.Option(min=1, help="Window after as_of the neighbour profile "
                                                            "describes.")] = 365.0,
    index_kind: Annotated[str, typer.Option("--index-kind", help="auto (exact up to 20,000 subjects, else HNSW), "
                                                                 "exact or usearch.")] = "auto",
    chunk_subjects: Annotated[int, typer.Option(min=1, help="Subjects encoded and written per chunk.")] = 1024,
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Embed a warehouse cohort with a trained model and build its similar-patient index.

    Opted-out subjects (--exclude-subjects) are hidden before anything is read: never embedded or indexed.
    """
    from foresight.embed import POOLINGS, embed_warehouse
    from foresight.forecast import Forecaster

    if pooling not in POOLINGS:
        fail(f"--pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    if split is not None and split not in SPLITS:
        fail(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    if not db.exists():
        fail(f"{db}: warehouse not found")
    when = parse_time(as_of, "--as-of")
    excluded = opt_out_list(exclude_subjects)
    try:
        fc = Forecaster.from_pretrained(model)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    with warehouse.connect(db, read_only=True) as con, err.status("embedding") as status:
        def progress(done: int, total: int) -> None:
            status.update(f"embedding: {done:,}/{total:,} subjects")

        try:
            meta = embed_warehouse(fc, con, out, model_dir=model, as_of=when, split=split,
                                   exclude_subjects=excluded, pooling=pooling, horizon_days=horizon_days,
                                   chunk_subjects=chunk_subjects, kind=index_kind, progress=progress)
        except ValueError as exc:
            fail(str(exc))
    payload = {**meta, "out": str(out), "embeddings": str(out / "embeddings.parquet")}
    emit(payload, as_json, f"embedded {meta['count']:,} subjects as of {meta['as_of']} ({pooling} pooling, "
                           f"width {meta['width']}); {meta['kind']} index in {out}")


def similar(
    index: Annotated[Path, typer.Option("--index", help="Folder written by `foresight embed`.")],
    subject: Annotated[int, typer.Option("--subject", help="An indexed subject_id.")],
    k: Annotated[int, typer.Option("--k", min=1, help="How many neighbours.")] = 10,
    small_cell_threshold: Annotated[int, typer.Option(min=1, help="Profile counts below this show as '<N'.")] = 8,
    rounding: Annotated[int, typer.Option(min=1, help="Other profile counts are rounded to this.")] = 5,
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """A subject's K nearest neighbours (ids and cosine distances: for analysts) and their aggregate profile
    (outcomes and most common events after as_of, small cells suppressed)."""
    from foresight.embed import SimilarIndex, released_profile

    excluded = opt_out_list(exclude_subjects) or set()
    try:
        idx = SimilarIndex(index)
        vector = idx.vector_of(subject)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    except KeyError as exc:
        fail(str(exc.args[0]))
    rule = SuppressionRule(small_cell_threshold, rounding)
    found = idx.neighbours(vector, k, exclude={subject, *excluded})
    profile = released_profile(idx.profile_of([s for s, _ in found]), rule, descriptions=idx.descriptions)
    payload = {"subject_id": subject, "k": k, "as_of": idx.meta.get("as_of"), "pooling": idx.meta.get("pooling"),
               "metric": idx.meta.get("metric"), "index_kind": idx.meta.get("kind"),
               "neighbours": [{"subject_id": s, "distance": round(d, 6), "split": idx.split_of.get(s)}
                              for s, d in found],
               "profile": profile, "suppression": {"threshold": rule.threshold, "rounding": rule.rounding}}
    lines = [f"{len(found)} neighbours of subject {subject} (as of {payload['as_of']}):"]
    lines += [f"  {n['subject_id']}  distance {n['distance']:.4f}" for n in payload["neighbours"]]
    lines += [f"  {o['outcome']}: {o['neighbours_with']} of {profile['neighbours']}" for o in profile["outcomes"]]
    emit(payload, as_json, "\n".join(lines))
