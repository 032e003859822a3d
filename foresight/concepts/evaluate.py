"""Measure the chain: the ConText rules against human labels, and concepts found in Synthea's FHIR notes against
the conditions coded in the same encounter (bench/notes.py runs both).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foresight import sources, warehouse
from foresight.concepts.annotation import Mention, annotate, context_status
from foresight.concepts.context import EXCLUDING, HYPOTHETICAL, NEGATED, ContextRules
from foresight.concepts.pack import BuildSummary, build_pack, load_pack

if TYPE_CHECKING:
    from medcat.cat import CAT

# foresight.sources.notes.load: (con, input_path, *, model_pack, n_process) -> LoadSummary. Passed in by the
# caller: the notes source builds on this package, so this package cannot import it.
LoadNotes = Callable[..., Any]


def prf(gold: dict[Any, set[str]], pred: dict[Any, set[str]]) -> dict[str, float | int]:
    """Micro precision, recall and F1 of predicted code sets against gold code sets per unit (encounter), with
    scikit-learn over the multilabel indicator matrices.

    >>> prf({"e1": {"a", "b"}, "e2": {"c"}}, {"e1": {"a"}, "e2": {"c", "d"}})["f1"]
    0.667
    """
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    units = sorted(set(gold) | set(pred))
    mlb = MultiLabelBinarizer(sparse_output=True)
    mlb.fit([gold.get(u, set()) | pred.get(u, set()) for u in units] or [set()])
    y_true = mlb.transform([gold.get(u, set()) for u in units])
    y_pred = mlb.transform([pred.get(u, set()) for u in units])
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    tp = int(y_true.multiply(y_pred).sum())
    return {"precision": round(float(p), 3), "recall": round(float(r), 3), "f1": round(float(f), 3),
            "tp": tp, "fp": int(y_pred.sum()) - tp, "fn": int(y_true.sum()) - tp}




def evaluate_context(export_path: str | Path, rules: ContextRules | None = None) -> dict[str, Any]:
    """Score the context rules against human labels: a MedCAT-trainer export whose annotations carry the
    meta-annotation ``Status`` (``Confirmed`` / ``Other``, as in CogStack's MTSamples tutorial export).

    Each annotated span is classified by ``rules`` on its whole document. The labels judge assertion (is the
    concept affirmed?), and the export labels family-history mentions Confirmed, so the main score predicts
    "Other" for negated or hypothetical mentions (``assertion``); ``exclusion`` also counts family mentions as
    "Other", as the notes source does when it drops them. Historical mentions count as Confirmed (a past diagnosis
    is a confirmed fact). Returns accuracy and precision/recall/F1 of "Other" for both, the confusion by our
    category, and the first disagreements of the assertion score.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rules = rules or ContextRules()
    data = json.loads(Path(export_path).read_text())
    gold: list[bool] = []
    preds: dict[str, list[bool]] = {"assertion": [], "exclusion": []}
    by_status: Counter[tuple[str, str]] = Counter()
    errors = []
    for project in data["projects"]:
        for doc in project["documents"]:
            anns = [a for a in doc["annotations"] if not a.get("deleted") and a.get("correct", True)]
            status = [{m["name"]: m["value"] for m in (a.get("meta_anns") or [])}.get("Status") for a in anns]
            keep = [(a, s) for a, s in zip(anns, status, strict=True) if s in ("Confirmed", "Other")]
            cats = rules.classify(doc["text"], [(a["start"], a["end"]) for a, _ in keep])
            for (a, s), c in zip(keep, cats, strict=True):
                gold.append(s == "Other")
                preds["assertion"].append(bool(c & {NEGATED, HYPOTHETICAL}))
                preds["exclusion"].append(bool(c & EXCLUDING))
                ours = context_status(c)
                by_status[(s, ours)] += 1
                if preds["assertion"][-1] != gold[-1] and len(errors) < 12:
                    errors.append({"gold": s, "ours": ours, "mention": a["value"],
                                   "context": doc["text"][max(0, a["start"] - 90):a["end"] + 40].replace("\n", " ")})
    out: dict[str, Any] = {"annotations": len(gold), "other": sum(gold)}
    for name, pred in preds.items():
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average="binary", zero_division=0)
        out[name] = {"accuracy": round(float(accuracy_score(gold, pred)), 3), "other_precision": round(float(p), 3),
                     "other_recall": round(float(r), 3), "other_f1": round(float(f), 3)}
    out["confusion"] = {f"{g} -> {o}": n for (g, o), n in sorted(by_status.items())}
    out["errors"] = errors
    return out



@dataclass
class SyntheaNotes:
    """What the evaluation reads from the warehouse after ``foresight etl fhir`` of a Synthea export."""

    notes: list[tuple[str, str, str]]  # (note_id, encounter_id, text)
    gold: dict[str, set[str]]  # encounter -> SNOMED codes of the conditions coded in it
    earlier: dict[str, set[str]]  # note -> SNOMED codes coded for the patient in earlier encounters


def read_synthea_notes(db: Path, fhir_folder: Path) -> SyntheaNotes:
    """Load ``fhir_folder`` into a new warehouse ``db`` and read its notes, each encounter's coded conditions and,
    per note, the conditions the patient had coded before the note (what a "history of X" should name)."""
    with warehouse.connect(db) as con:
        sources.load("fhir", con, fhir_folder)
        notes = con.execute("SELECT note_id, encounter_id, text FROM notes ORDER BY note_id").fetchall()
        gold_rows = con.execute(
            """SELECT encounter_id, list(DISTINCT split_part(code, '//', 3)) FROM events
               WHERE code LIKE 'DX//SNOMED//%' AND encounter_id IN (SELECT encounter_id FROM notes) GROUP BY 1"""
        ).fetchall()
        earlier_rows = con.execute(
            """SELECT n.note_id, list(DISTINCT split_part(e.code, '//', 3)) FROM notes n JOIN events e
               ON e.subject_id = n.subject_id AND e.code LIKE 'DX//SNOMED//%' AND e.time < n.time
               AND e.encounter_id IS DISTINCT FROM n.encounter_id GROUP BY 1"""
        ).fetchall()
    return SyntheaNotes(notes, {enc: set(codes) for enc, codes in gold_rows},
                        {nid: set(codes) for nid, codes in earlier_rows})


def _code_value(code: str) -> str:
    return code.split("//")[-1]


# Which mentions count as the encounter's diagnoses: every mention (no context filter), the mentions that become
# events (negated, hypothetical and family mentions dropped) and only those timed at the note (historical ones
# dropped too, since "history of X" is not this encounter's diagnosis).
SCORED_VARIANTS: dict[str, Callable[[Mention], bool]] = {
    "all_mentions": lambda m: True,
    "context_filtered": lambda m: m.affirmed,
    "current_only": lambda m: m.status == "current",
}


def predicted_codes(mentions: dict[str, list[Mention]], encounter: dict[str, str],
                    keep: Callable[[Mention], bool]) -> dict[str, set[str]]:
    """encounter -> codes of the kept mentions of its notes."""
    pred: dict[str, set[str]] = defaultdict(set)
    for note_id, ms in mentions.items():
        pred[encounter[note_id]] |= {_code_value(m.code) for m in ms if keep(m)}
    return pred


def historical_support(mentions: dict[str, list[Mention]], earlier: dict[str, set[str]]) -> tuple[int, int]:
    """The history rule's check: (historical (note, concept) pairs, those coded in an earlier encounter)."""
    hist = {(nid, _code_value(m.code)) for nid, ms in mentions.items() for m in ms if m.status == "historical"}
    return len(hist), sum(1 for nid, c in hist if c in earlier.get(nid, set()))


def top_errors(cat: CAT, gold: dict[str, set[str]], pred: dict[str, set[str]], n: int = 8) -> dict[str, list]:
    """The most often missed and the most often extra codes, with the concept's name."""

    def name(code: str) -> str:
        return cat.cdb.get_name(code) if code in cat.cdb.cui2info else ""

    fn_codes: Counter[str] = Counter()
    fp_codes: Counter[str] = Counter()
    for enc in set(gold) | set(pred):
        fn_codes.update(gold.get(enc, set()) - pred.get(enc, set()))
        fp_codes.update(pred.get(enc, set()) - gold.get(enc, set()))
    return {"top_missed": [(c, name(c), k) for c, k in fn_codes.most_common(n)],
            "top_extra": [(c, name(c), k) for c, k in fp_codes.most_common(n)]}


def check_notes_load(db: Path, pack: str | Path, filtered: dict[str, set[str]], load_notes: LoadNotes,
                     n_process: int) -> dict[str, Any]:
    """Load the warehouse's notes with the notes source (``load_notes``) and compare its events, per encounter, with
    the context-filtered concepts: the real load path must produce exactly those."""
    with warehouse.connect(db) as con:
        summary = load_notes(con, db, model_pack=pack, n_process=n_process)
        loaded = con.execute(
            "SELECT encounter_id, list(DISTINCT split_part(code, '//', 3)) FROM events WHERE source = 'notes' "
            "GROUP BY 1").fetchall()
    return {
        "load": {k: summary.to_json()[k] for k in ("rows_read", "rows_loaded", "rows_quarantined", "rows_dropped",
                                                   "dropped_reasons", "events", "subjects")},
        "load_matches_filtered": {enc: set(c) for enc, c in loaded} == {k: v for k, v in filtered.items() if v},
    }


def evaluate_synthea(
    export_root: str | Path,
    workdir: str | Path,
    *,
    n_process: int = 1,
    train: bool = True,
    progress: Callable[[int, int], None] | None = None,
    load_notes: LoadNotes | None = None,
) -> dict[str, Any]:
    """Build a pack from a Synthea export's condition dictionary, annotate its FHIR notes and score the concepts
    against the conditions coded in the same encounter.

    Steps (all in ``workdir``): ``foresight etl fhir`` of ``<export>/fhir`` into a warehouse; a pack from
    ``<export>/csv/conditions.csv`` (SNOMED), trained unsupervised on the warehouse's notes if ``train``;
    every note annotated once; gold = the encounter's ``DX//SNOMED//<code>`` events. Scored per encounter
    (micro over (encounter, code) pairs) three ways (:data:`SCORED_VARIANTS`); and the share of historical
    (note, concept) pairs that name a condition coded in an earlier encounter. Finally, given ``load_notes``
    (:func:`foresight.sources.notes.load`), the notes source loads the same notes into the warehouse, and the
    loaded events must equal the filtered mentions (``load``, ``load_matches_filtered``).
    """
    export_root, workdir = Path(export_root), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "synthea_notes.duckdb"
    db.unlink(missing_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data = read_synthea_notes(db, export_root / "fhir")
    timings["etl_fhir_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    build = build_pack([export_root / "csv" / "conditions.csv"], workdir / "synthea_conditions_pack",
                       train_texts=[n[2] for n in data.notes] if train else None)
    timings["build_pack_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    cat = load_pack(build.pack)
    mentions: dict[str, list[Mention]] = {}
    for i, (note_id, ms) in enumerate(annotate(cat, [(n[0], n[2]) for n in data.notes], n_process=n_process,
                                                   pack_path=build.pack), 1):
        mentions[note_id] = ms
        if progress:
            progress(i, len(data.notes))
    timings["annotate_s"] = round(time.perf_counter() - t, 2)

    encounter = {n[0]: n[1] for n in data.notes}
    preds = {name: predicted_codes(mentions, encounter, keep) for name, keep in SCORED_VARIANTS.items()}
    hist, supported = historical_support(mentions, data.earlier)
    load_check: dict[str, Any] = {}
    if load_notes is not None:
        t = time.perf_counter()
        load_check = check_notes_load(db, build.pack, preds["context_filtered"], load_notes, n_process)
        timings["etl_notes_s"] = round(time.perf_counter() - t, 2)
    return {
        "notes": len(data.notes),
        "encounters_with_gold": len(data.gold),
        "gold_pairs": sum(len(v) for v in data.gold.values()),
        "pack": _pack_summary(build),
        "mentions_by_status": dict(Counter(m.status for ms in mentions.values() for m in ms)),
        "historical_pairs": hist,
        "historical_coded_earlier": round(supported / hist, 3) if hist else None,
        "scores": {name: prf(data.gold, pred) for name, pred in preds.items()},
        **load_check,
        **top_errors(cat, data.gold, preds["current_only"]),
        "timings": timings,
    }


def _pack_summary(build: BuildSummary) -> dict[str, Any]:
    return {k: v for k, v in build.__dict__.items() if k not in ("dictionaries",)}
