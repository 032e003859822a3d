"""Cross-source shift study (issue 20): does a model trained on one source travel to another, what does the move
cost in discrimination (AUROC) and calibration (ECE), and what recovers it: recalibration only, or fine-tuning on a
little target data?

**(a) Simulator shift.** SOURCE: the demo's hazards (:func:`foresight.demo.demo_config`, admissions x3), the
cohort and model of ``bench/quality.py`` (its helpers are imported, not copied). TARGET: the same simulator with an
explicit shift, :func:`shifted_config` (a different catchment: older age mix, other ethnic mix, emergency admissions
x1.3) and, on a COPY of its MEDS files that the warehouse loads, :func:`recode_meds`'s coding habits (a share of
ICD-10-CM diagnoses recorded at their 3-character parent; creatinine in umol/L, x88.4, under the same code). The
oracle reads the UNSHIFTED target simulation (the truth). Rows, per task, each with AUROC and ECE and patient-
bootstrap 95% CIs, the oracle on the same points and the paired AUROC gap model - oracle:

1. in-source: source model on source held-out;
2. zero-shot: source model on target held-out (the target's own token folder re-read in the model's vocabulary by
   ``foresight evaluate``'s rule; ``lost_code_share`` = target events whose exact code the model lacks);
3. + recalibration only: the zero-shot risks Platt-recalibrated on target TUNING points;
4. + fine-tuning on N = 100 and N = 1,000 target train subjects (``train --init-from``; the target warehouse
   encoded in the model's vocabulary by :func:`foresight.evaluate.crosssource.encode_in_vocabulary`, then cut to N
   subjects by :func:`subset_tokens`), with and without recalibration; fine-tuning rows also carry the paired
   AUROC / Brier difference vs zero-shot on the same target points.

**(b) Synthea CSV vs its FHIR copy** (``../shared/data/synthea-ca-59pt``): a tiny model trained on the CSV
warehouse, scored on the FHIR warehouse: ``lost_code_share`` and next-event top-k vs frequency and Markov (59
patients: no risk AUROC is resolvable, and none is reported).

**(c) The simulator-trained model on the MIMIC-IV demo** (``../shared/data/mimic-iv-demo-2.2``): ``lost_code_share``,
next-event top-10 vs a Markov chain fitted on MIMIC train (in the model's vocabulary), and in-hospital mortality at
admissions with the number of positives.

Everything is cached under ``--out`` (cohorts, models, each scoring's ``score.json``); a rerun redoes only what is
missing (``--force`` redoes the scorings). Writes ``OUT/shift.md`` (the tables) and ``OUT/shift.json``.

Smoke test (~3 min, numbers meaningless)::

    OMP_NUM_THREADS=1 python bench/shift.py --lives 600 --steps 40 --ft-max-steps 10 --max-points 60 --samples 2 \\
        --ft-subjects 50 100 --out bench/out/shift-smoke

The study (2-core CPU shared with other jobs, one thread: ~60-80 min; each risk scoring ~20 min there)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 15 python bench/shift.py --out bench/out/shift

(a)'s rows can run in separate processes (``--parts a --rows zero-shot``, ``--rows finetune --ft-subjects 100``,
...; never two processes on the same row), then one run of everything reports from the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from bench import quality  # noqa: E402  (its cohort cache, trainer and console)

console = quality.console
SHARED = REPO.parent / "shared" / "data"

# --- the target's shift, explicit -----------------------------------------------------------------------------

EMERGENCY_SCALE = 1.3  # emergency admission hazards x1.3 (on top of the demo's x3)
BIRTH_SPAN_YEARS = 125  # default 105: births spread further back, so more old people alive in the window
DEMOGRAPHICS = {"male": 0.47, "race": {"WHITE": 0.45, "BLACK": 0.25, "ASIAN": 0.12, "OTHER": 0.18},
                "hispanic": 0.25}  # default: male 0.49, WHITE 0.62 / BLACK 0.13 / ASIAN 0.07, hispanic 0.18
YOUNG_BORN_FROM, YOUNG_KEEP = "1970-01-01", 0.5  # the catchment's age mix: half of those born since 1970 are not in it
TARGET_OVERSAMPLE = 1.4  # the target simulates this many more lives, so ~as many remain after the age selection
PARENT_SHARE = 0.40  # share of ICD-10-CM diagnoses (longer than 3 characters) recorded at the 3-character parent
CREATININE = "LAB//LOINC//2160-0"
UMOL_PER_MGDL = 88.4  # creatinine mg/dL -> umol/L


def shifted_config() -> dict[str, Any]:
    """The target's simulator configuration: the demo's, with :data:`EMERGENCY_SCALE`, :data:`BIRTH_SPAN_YEARS`
    and :data:`DEMOGRAPHICS` applied."""
    from foresight.demo import demo_config
    from foresight.simulate import catalog as cat

    cfg = demo_config()
    for proc in cfg["processes"].values():
        if proc["kind"] == "admission" and cat.CAUSES[cat.CAUSE[proc["target"]]].admit == "EMERGENCY":
            proc["per_1000py"] = [r * EMERGENCY_SCALE for r in proc["per_1000py"]]
    cfg["calendar"]["birth_span_years"] = BIRTH_SPAN_YEARS
    cfg["demographics"] = json.loads(json.dumps(DEMOGRAPHICS))
    return cfg


def _md5_share(expr: str, share: float) -> str:
    """SQL: true for a deterministic ``share`` of the values of ``expr`` (by their md5)."""
    return f"(('0x' || substr(md5({expr}), 1, 7))::BIGINT % 1000 < {int(share * 1000)})"


def recode_meds(src: Path, dst: Path, share: float = PARENT_SHARE) -> dict[str, int]:
    """A copy of MEDS dataset ``src`` at ``dst`` as the target's warehouse sees it. Its age mix: of the subjects born
    on or after :data:`YOUNG_BORN_FROM`, only a :data:`YOUNG_KEEP` share (by an md5 of the subject id) is in the
    catchment. Its coding habits: a deterministic ``share`` of the ICD-10-CM diagnosis events (those whose code is
    longer than 3 characters; by an md5 of subject, time and code) recorded at the 3-character parent, and
    creatinine values x88.4 (umol/L) under the same code. Returns how many subjects and events each changed."""
    import duckdb

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.parquet"))
    shutil.copytree(src / "metadata", dst / "metadata", dirs_exist_ok=True)
    event_key = "concat_ws('|', subject_id, time, code)"
    pick = f"(code LIKE 'DX//ICD10CM//%' AND length(code) > 16 AND {_md5_share(event_key, share)})"
    counts = {"dx_events": 0, "dx_recorded_at_parent": 0, "creatinine_values_in_umol": 0}
    with duckdb.connect() as con:
        con.execute(f"""CREATE TABLE dropped AS SELECT DISTINCT subject_id FROM read_parquet('{src}/data/**/*.parquet')
            WHERE code = 'MEDS_BIRTH' AND time >= '{YOUNG_BORN_FROM}'
              AND NOT {_md5_share("subject_id::VARCHAR", YOUNG_KEEP)}""")
        counts["subjects_left_out_by_age"] = con.execute("SELECT count(*) FROM dropped").fetchone()[0]
        for shard in sorted((src / "data").rglob("*.parquet")):
            out = dst / shard.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            rel = f"(SELECT * FROM read_parquet('{shard}') WHERE subject_id NOT IN (SELECT subject_id FROM dropped))"
            con.execute(f"""COPY (SELECT subject_id, time,
                    CASE WHEN {pick} THEN left(code, 16) ELSE code END AS code,
                    CASE WHEN code = '{CREATININE}' THEN (numeric_value * {UMOL_PER_MGDL})::FLOAT
                         ELSE numeric_value END AS numeric_value,
                    text_value,
                    CASE WHEN code = '{CREATININE}' THEN 'umol/L' ELSE unit END AS unit
                FROM {rel}) TO '{out}' (FORMAT parquet)""")
            a, b, c = con.execute(f"SELECT count(*) FILTER (code LIKE 'DX//ICD10CM//%'), count(*) FILTER ({pick}), "
                                  f"count(*) FILTER (code = '{CREATININE}' AND numeric_value IS NOT NULL) "
                                  f"FROM {rel}").fetchone()
            counts["dx_events"] += a
            counts["dx_recorded_at_parent"] += b
            counts["creatinine_values_in_umol"] += c
    return counts


def target_cohort(out: Path, lives: int, seed: int, workers: int, min_subjects: int) -> dict[str, Any]:
    """The shifted cohort: ``sim`` (the truth, for the oracle), ``sim-coded`` (its MEDS copy with the coding habits,
    what the warehouse loads), the warehouse and its own token folder; each step skipped when done."""
    from foresight import sources, warehouse
    from foresight import tokens as T
    from foresight.simulate import simulate

    root = out / "target" / f"n{lives}-s{seed}"
    sim, coded, db, tok = root / "sim", root / "sim-coded", root / "warehouse.duckdb", root / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    stats_path = root / "cohort.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    if not (tok / "COMPLETE").exists() or "recode" not in stats:
        with console.status(f"[target {lives:,}] simulating, recoding, loading, tokenizing"):
            simulate(round(lives * TARGET_OVERSAMPLE), sim, seed=seed, config=shifted_config(), workers=workers)
            stats = {"recode": recode_meds(sim, coded)}
            db.unlink(missing_ok=True)
            with warehouse.connect(db) as con:
                stats["load"] = sources.load("meds", con, coded).to_json()["events"]
            stats["tokenize"] = T.tokenize(db, tok, T.TokenizerConfig(min_subjects=min_subjects))["vocab_size"]
        stats_path.write_text(json.dumps(stats, indent=1))
    return {"root": root, "sim": sim, "db": db, "tokens": tok, "stats": stats}


def cohort_profile(db: Path) -> dict[str, Any]:
    """Median age on 2020-01-01 of those alive then, and emergency admissions per 1,000 subjects (the shift's size)."""
    from foresight import warehouse

    with warehouse.connect(db, read_only=True) as con:
        age = con.execute("SELECT median(date_diff('day', b.time, DATE '2020-01-01') / 365.25) FROM events b "
                          "WHERE b.code = 'MEDS_BIRTH' AND b.time < DATE '2020-01-01' AND NOT EXISTS (SELECT 1 FROM "
                          "events d WHERE d.subject_id = b.subject_id AND d.code = 'MEDS_DEATH' AND d.time < DATE "
                          "'2020-01-01')").fetchone()[0]
        n = con.execute("SELECT count(DISTINCT subject_id) FROM events").fetchone()[0]
        em = con.execute("SELECT count(*) FROM events WHERE code = 'ADMIT//EMERGENCY'").fetchone()[0]
    return {"median_age_2020": round(float(age), 1), "subjects": n,
            "emergency_admissions_per_1000": round(1000 * em / n)}


# --- token folders: a subset of subjects ----------------------------------------------------------------------


def subset_tokens(src: Path, dst: Path, n: int, seed: int = 0) -> dict[str, int]:
    """A sealed token folder at ``dst``: ``src`` with only ``n`` of its train subjects (a seeded random choice;
    tuning and held_out whole), so ``train`` sees N target subjects. Returns subjects and tokens kept."""
    from foresight.tokens import INDEX_DTYPE, Vocabulary
    from foresight.tokens.folder import building, check_complete

    check_complete(src)
    vocab = Vocabulary.load(src / "vocab.json")
    index = np.load(src / "train.index.npy")
    keep = np.sort(np.random.default_rng(seed).choice(len(index), size=min(n, len(index)), replace=False))
    tokens = np.fromfile(src / "train.bin", dtype=vocab.dtype)
    clock = np.fromfile(src / "train.clock.bin", dtype=np.int32)
    rows = index[keep].copy()
    parts = [slice(int(r["offset"]), int(r["offset"] + r["length"])) for r in rows]
    rows["offset"] = np.concatenate([[0], np.cumsum(rows["length"])[:-1]]).astype(np.int64)
    with building(dst) as tmp:
        for name in os.listdir(src):
            if not name.startswith("train.") and name != "COMPLETE":
                shutil.copyfile(src / name, tmp / name)
        np.concatenate([tokens[s] for s in parts]).astype(vocab.dtype).tofile(tmp / "train.bin")
        np.concatenate([clock[s] for s in parts]).astype(np.int32).tofile(tmp / "train.clock.bin")
        np.save(tmp / "train.index.npy", rows.astype(INDEX_DTYPE))
    return {"subjects": len(rows), "tokens": int(rows["length"].sum())}


def by_vocabulary(data_dir: Path, model_vocab: Any, split: str = "held_out") -> dict[str, dict[str, int]]:
    """Held-out event tokens of ``data_dir`` per ``KIND//VOCAB``: kept exactly by the model's vocabulary, mapped to
    an ancestor it knows, mapped to RARE, or already RARE in the target's own tokenizer (its privacy floor)."""
    from foresight.evaluate.crosssource import token_map
    from foresight.tokens import Vocabulary

    vocab = Vocabulary.load(data_dir / "vocab.json")
    ids, lost = token_map(model_vocab, vocab)
    counts = np.bincount(np.fromfile(data_dir / f"{split}.bin", dtype=vocab.dtype), minlength=len(vocab.tokens))
    out: dict[str, dict[str, int]] = {}
    for i in np.flatnonzero(vocab.is_event & (counts > 0)):
        name, mapped = vocab.tokens[i], model_vocab.tokens[ids[i]]
        rare = name == "RARE" or name.endswith("//RARE")
        how = ("rare_in_target" if rare else "exact" if not lost[i] else
               "rare" if mapped == "RARE" or mapped.endswith("//RARE") else "ancestor")
        row = out.setdefault("//".join(name.split("//")[:2]), {"events": 0, "exact": 0, "ancestor": 0, "rare": 0,
                                                               "rare_in_target": 0})
        row["events"] += int(counts[i])
        row[how] += int(counts[i])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["events"]))


# --- scoring: next events and risk tasks, predictions kept for paired differences -----------------------------


def score(model: Path, tokens: Path, db: Path | None, out: Path, args: argparse.Namespace,
          oracle: Callable | None, tasks: Sequence[str], admission_tasks: Sequence[str]) -> dict[str, Any]:
    """``foresight evaluate``'s pieces (cross-source re-reading, next-event accuracy, risk tasks with baselines,
    oracle and Platt recalibration on tuning points) with each task's predictions kept; cached in score.json."""
    from foresight.evaluate import ADMISSION_TASKS
    from foresight.evaluate.crosssource import tokens_for_model
    from foresight.evaluate.next_event import next_event_accuracy
    from foresight.evaluate.report import RiskScoring
    from foresight.forecast import Forecaster, load_task

    path = out / "score.json"
    if path.exists() and not args.force:
        return json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fc = Forecaster.from_pretrained(model)
    tok_dir, cross = tokens_for_model(tokens, fc.vocab, model / "vocab.json", out)
    with console.status(f"  next events: {out.name}"):
        ne = next_event_accuracy(fc, tok_dir, max_rows=args.next_event_rows).to_json()
    result: dict[str, Any] = {"model": str(model), "tokens": str(tokens), "db": str(db), "cross_source": cross,
                              "next_event": ne, "tasks": []}
    if not cross["same_vocabulary"]:
        result["by_vocabulary"] = by_vocabulary(tokens, fc.vocab)
    plan = [(kind, ts) for kind, ts in (("discharges", [load_task(t) for t in tasks]),
                                        ("admissions", [ADMISSION_TASKS[t] for t in admission_tasks])) if ts]
    if db is not None and plan:
        scoring = RiskScoring(fc, as_of=None, samples=args.samples, max_points=args.max_points, oracle=oracle,
                              seed=args.eval_seed, calibration="platt")
        with console.status(f"  risk tasks: {out.name}"):
            scoring.run(db, plan)
        result["tasks"], result["skipped"] = scoring.results, scoring.skipped
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(result, default=str))
    console.log(f"  scored {out.name} in {result['seconds'] / 60:.1f} min")
    return result


def finetune(model: Path, data: Path, out: Path, args: argparse.Namespace, n_tokens: int) -> dict[str, Any]:
    """``train --init-from model`` on ``data`` for ``--ft-epochs`` passes over its train tokens (clamped to
    [``--ft-min-steps``, ``--ft-max-steps``]), at ``--ft-lr``; returns the training record (cached)."""
    from foresight.train import TrainConfig, train

    rec_path = out / "finetune.json"
    if rec_path.exists() and (out / "model" / "foresight.json").exists():
        return json.loads(rec_path.read_text())
    per_step = 8 * args.context
    steps = int(min(args.ft_max_steps, max(args.ft_min_steps, math.ceil(args.ft_epochs * n_tokens / per_step))))
    cfg = TrainConfig(preset=args.preset, seq_len=args.context, micro_batch=8, max_steps=steps,
                      warmup_steps=max(1, steps // 20), lr=args.ft_lr, min_lr=args.ft_lr / 10, eval_every=0,
                      eval_rows=64, checkpoint_every=0, log_every=max(1, steps // 5), seed=0, init_from=str(model))
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    t0 = time.perf_counter()
    with console.status(f"  fine-tuning {out.name}: {steps} steps") as status:
        summary = train(data, out / "model", cfg, log=lambda m: status.update(f"  fine-tuning: {m[:110]}"))
    rec = {"steps": steps, "train_tokens_seen": steps * per_step, "subset_tokens": n_tokens,
           "epochs": round(steps * per_step / max(n_tokens, 1), 2), "lr": args.ft_lr,
           "minutes": round((time.perf_counter() - t0) / 60, 2),
           "tuning_loss": summary.get("metrics", {}).get("tuning_loss")}
    rec_path.write_text(json.dumps(rec, indent=1))
    console.log(f"  fine-tuned {out.name}: {steps} steps in {rec['minutes']} min, tuning loss {rec['tuning_loss']}")
    return rec


# --- the three parts ------------------------------------------------------------------------------------------


def source_model(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The source cohort and its model, by ``bench/quality.py``'s own cached steps."""
    c = quality.cohort(args.out, args.lives, args.cohort_seed, args.workers, args.min_subjects)
    qargs = quality.parse_args(["--out", str(args.out)])
    qargs.lr, qargs.min_lr = 3e-3, 3e-4
    rdir = args.out / "runs" / quality.row_id(args.lives, args.preset, args.context, args.steps * 2048, 0)
    rdir.mkdir(parents=True, exist_ok=True)
    rec = quality.train_row(c, rdir, qargs, args.preset, args.context, args.steps * 2048, 0)
    c["train"] = rec
    return c, rdir / "model"


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    from foresight.evaluate.crosssource import encode_in_vocabulary
    from foresight.pipeline import simulator_oracle

    console.rule("(a) simulator shift")
    src, model = source_model(args)
    tgt = target_cohort(args.out, args.lives, args.target_seed, args.workers, args.min_subjects)
    runs = args.out / "a"
    tasks, adm = args.tasks, args.admission_tasks
    scores: dict[str, Any] = {}

    def row(name: str, kind: str, run: Callable[[], dict[str, Any]], cached: Path) -> None:
        """Score a row of ``--rows``; another row is taken from its cache when there (several processes can share
        the study: ``--rows in-source`` in one, ``--rows zero-shot`` in another, then a run of all to report)."""
        if kind in args.rows:
            scores[name] = run()
        elif cached.exists():
            scores[name] = json.loads(cached.read_text())

    row("in-source", "in-source", lambda: score(model, src["tokens"], src["db"], runs / "in-source", args,
                                                simulator_oracle(src["sim"]), tasks, adm),
        runs / "in-source" / "score.json")
    oracle_t = simulator_oracle(tgt["sim"]) if set(args.rows) - {"in-source"} else None  # the target's truth
    row("zero-shot", "zero-shot", lambda: score(model, tgt["tokens"], tgt["db"], runs / "zero-shot", args, oracle_t,
                                                tasks, adm), runs / "zero-shot" / "score.json")
    in_model = args.out / "target" / "tokens-in-model-vocab"
    if "finetune" in args.rows and not (in_model / "COMPLETE").exists():
        encode_in_vocabulary(tgt["db"], model, in_model)
    finetunes = {}
    for n in args.ft_subjects:
        fdir = runs / f"finetune-n{n}"
        if "finetune" in args.rows:
            sub = subset_tokens(in_model, args.out / "target" / f"tokens-n{n}", n, seed=0)
            finetunes[n] = {**finetune(model, args.out / "target" / f"tokens-n{n}", fdir, args, sub["tokens"]),
                            "subjects": sub["subjects"]}
        elif (fdir / "finetune.json").exists():
            finetunes[n] = {**json.loads((fdir / "finetune.json").read_text()), "subjects": n}
        row(f"fine-tune N={n}", "finetune", lambda fdir=fdir: score(fdir / "model", in_model, tgt["db"], fdir, args,
                                                                     oracle_t, tasks, adm), fdir / "score.json")
    return {"source": {"cohort": str(src["root"]), "profile": cohort_profile(src["db"]), "train": src["train"],
                       "stats": src["stats"]},
            "target": {"cohort": str(tgt["root"]), "profile": cohort_profile(tgt["db"]), "stats": tgt["stats"],
                       "shift": {"emergency_scale": EMERGENCY_SCALE, "birth_span_years": BIRTH_SPAN_YEARS,
                                 "demographics": DEMOGRAPHICS, "parent_share": PARENT_SHARE,
                                 "creatinine_factor": UMOL_PER_MGDL}},
            "finetunes": finetunes, "scores": scores}


def load_source(kind: str, path: Path, db: Path) -> Path:
    from foresight import sources, warehouse

    if not db.exists():
        with warehouse.connect(db) as con:
            sources.load(kind, con, path)
    return db


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    from foresight import tokens as T
    from foresight.train import TrainConfig, train

    console.rule("(b) Synthea CSV -> FHIR")
    root, data = args.out / "synthea", SHARED / "synthea-ca-59pt"
    root.mkdir(parents=True, exist_ok=True)
    csv_db = load_source("synthea", data / "csv", root / "csv.duckdb")
    fhir_db = load_source("fhir", data / "fhir", root / "fhir.duckdb")
    for db, tok in ((csv_db, root / "tok-csv"), (fhir_db, root / "tok-fhir")):
        if not (tok / "COMPLETE").exists():
            T.tokenize(db, tok, T.TokenizerConfig(min_subjects=args.small_min_subjects))
    model = root / "model"
    if not (model / "foresight.json").exists():
        with console.status("  training on the Synthea CSV warehouse"):
            train(root / "tok-csv", model, TrainConfig(preset=args.preset, seq_len=args.context, micro_batch=8,
                                                       max_steps=args.small_steps, warmup_steps=20, lr=3e-3,
                                                       min_lr=3e-4, eval_every=0, eval_rows=64, checkpoint_every=0))
    scores = {"in-source (CSV held-out)": score(model, root / "tok-csv", None, root / "in-source", args, None, [], []),
              "cross-source (FHIR held-out)": score(model, root / "tok-fhir", None, root / "fhir", args, None, [], [])}
    return {"splits": {name: split_sizes(db) for name, db in (("csv", csv_db), ("fhir", fhir_db))},
            "same_people_same_split": same_splits(csv_db, fhir_db), "scores": scores}


def split_sizes(db: Path) -> dict[str, int]:
    from foresight import warehouse

    with warehouse.connect(db, read_only=True) as con:
        return dict(con.execute("SELECT split, count(*) FROM subject_splits GROUP BY 1").fetchall())


def same_splits(a: Path, b: Path) -> bool:
    """Whether each patient (source id) lands in the same split in both warehouses (so no FHIR held-out patient was
    a CSV training patient)."""
    from foresight import warehouse

    def splits(db: Path) -> dict[str, str]:
        with warehouse.connect(db, read_only=True) as con:
            return dict(con.execute("SELECT m.source_id, s.split FROM subject_map m JOIN subject_splits s "
                                    "USING (subject_id)").fetchall())

    sa, sb = splits(a), splits(b)
    return all(sa[k] == v for k, v in sb.items() if k in sa)


def part_c(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    from foresight import tokens as T

    console.rule("(c) simulator model on the MIMIC-IV demo")
    root = args.out / "mimic"
    root.mkdir(parents=True, exist_ok=True)
    db = load_source("mimic-iv", SHARED / "mimic-iv-demo-2.2", root / "mimic.duckdb")
    if not (root / "tok" / "COMPLETE").exists():
        T.tokenize(db, root / "tok", T.TokenizerConfig(min_subjects=args.small_min_subjects))
    res = score(model, root / "tok", db, root / "sim-model", args, None, [], ["in_hospital_mortality"])
    return {"splits": split_sizes(db), "scores": {"simulator model on MIMIC held-out": res}}


# --- tables ---------------------------------------------------------------------------------------------------


def _fmt(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(res: dict[str, Any], metric: str, nd: int = 3) -> str:
    value = res["metrics"].get(metric)
    lo_hi = res.get("ci95", {}).get(metric)
    return _fmt(value, nd) + (f" [{lo_hi[0]:.{nd}f}, {lo_hi[1]:.{nd}f}]" if lo_hi else "")


def _diff(d: dict[str, Any] | None, key: str = "auroc", nd: int = 3) -> str:
    if not d or d.get(key) is None or math.isnan(d[key]):
        return "n/a"
    ci = d.get("ci" if key == "auroc" else "brier_ci")
    return f"{d[key]:+.{nd}f}" + (f" [{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]" if ci else "")


def vs_reference(task: dict[str, Any], ref: dict[str, Any] | None, who: str) -> dict[str, Any] | None:
    """Paired AUROC / Brier of ``who`` in ``task`` minus the reference task's model, on the points both scored."""
    from foresight.evaluate.metrics import paired_difference

    if ref is None or task["_subjects"] != ref["_subjects"] or who not in task["_p"]:
        return None
    return paired_difference(np.array(task["_y"]), np.array(task["_p"][who]), np.array(ref["_p"]["model"]),
                             np.array(task["_subjects"]), seed=0)


def part_a_table(a: dict[str, Any]) -> str:
    lines = ["| row | task @ points | points (pos.) | AUROC [95% CI] | ECE [95% CI] | Brier | oracle AUROC | "
             "model - oracle AUROC (paired) | vs zero-shot: AUROC, Brier (paired) | lost_code_share | next-event "
             "top-10 (Markov) |", "|---|---|---:|---|---|---:|---:|---|---|---:|---|"]
    zero = {t["task"]: t for t in a["scores"].get("zero-shot", {"tasks": []})["tasks"]}
    for name, s in a["scores"].items():
        ne = s["next_event"]
        for t in s["tasks"]:
            for who, label in (("model", name), ("model_calibrated", f"{name} + recalibration (platt, tuning)")):
                if who not in t:
                    continue
                ref = zero.get(t["task"]) if name != "in-source" else None
                vs = vs_reference(t, ref, who) if not (name == "zero-shot" and who == "model") else None
                orc = t.get("oracle", {}).get("metrics", {}).get("auroc")
                pos = round(t["observed_rate"] * t["points"])
                lines.append(
                    f"| {label} | {t['task']} @ {t['at']} | {t['points']:,} ({pos}) | {_ci(t[who], 'auroc')} | "
                    f"{_ci(t[who], 'ece')} | {_fmt(t[who]['metrics']['brier'], 4)} | "
                    f"{_fmt(orc)} | {_diff(t['paired'].get(f'{who}-oracle'))} | "
                    f"{_diff(vs)}, {_diff(vs, 'brier', 4)} | {_fmt(s['cross_source']['lost_code_share'])} | "
                    f"{_fmt(ne['topk']['top10'])} ({_fmt(ne['baselines']['markov']['top10'])}) |")
    return "\n".join(lines) + "\n"


def next_event_table(part: dict[str, Any]) -> str:
    lines = ["| row | lost_code_share (events) | codes lost | already RARE in target | positions | top-1 / 5 / 10 | "
             "frequency top-10 | Markov top-10 | risk task (points, positives): AUROC [95% CI], ECE |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for name, s in part["scores"].items():
        cs, ne = s["cross_source"], s["next_event"]
        risks = "; ".join(f"{t['task']} @ {t['at']} ({t['points']}, {round(t['observed_rate'] * t['points'])}): "
                          f"{_ci(t['model'], 'auroc')}, {_fmt(t['model']['metrics']['ece'])}" for t in s["tasks"])
        risks += "; ".join(f"skipped {k['task']}: {k['reason']}" for k in s.get("skipped", []))
        lines.append(f"| {name} | {_fmt(cs['lost_code_share'])} ({cs.get('lost', 0):,} of {cs.get('events', 0):,}) | "
                     f"{cs.get('codes_lost', 0)} | {cs.get('already_rare_in_target', 'n/a')} | {ne['positions']:,} | "
                     f"{_fmt(ne['topk']['top1'])} / {_fmt(ne['topk']['top5'])} / {_fmt(ne['topk']['top10'])} | "
                     f"{_fmt(ne['baselines']['frequency']['top10'])} | {_fmt(ne['baselines']['markov']['top10'])} | "
                     f"{risks or 'none scored'} |")
    return "\n".join(lines) + "\n"


def vocabulary_table(results: dict[str, Any], top: int = 8) -> str:
    """Per KIND//VOCAB of each cross-source scoring: held-out events kept exactly, via an ancestor, or as RARE."""
    lines = ["| part, row | KIND//VOCAB | events | exact | ancestor | RARE (model lacks it) | RARE already in target |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for part in ("a", "b", "c"):
        for name, s in results.get(part, {}).get("scores", {}).items():
            rows = list(s.get("by_vocabulary", {}).items())
            for kv, r in rows[:top] + [(k, r) for k, r in rows[top:] if k.startswith("DX//")]:
                n = max(r["events"], 1)
                lines.append(f"| ({part}) {name} | {kv} | {r['events']:,} | {r['exact'] / n:.3f} | "
                             f"{r['ancestor'] / n:.3f} | {r['rare'] / n:.3f} | {r['rare_in_target'] / n:.3f} |")
    return "\n".join(lines) + "\n"


def strip(obj: Any) -> Any:
    """The results without the per-point predictions (``_y``, ``_p``, ``_subjects``), for shift.json."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    text = f"Command: `{results['command']}`\n\n"
    if "a" in results:
        a = results["a"]
        text += (f"(a) source {a['source']['profile']} vs target {a['target']['profile']}; target coding habits: "
                 f"{a['target']['stats']['recode']}; fine-tuning: "
                 + "; ".join(f"N={n}: {f['subjects']} subjects, {f['steps']} steps ({f['epochs']} epochs), "
                             f"{f['minutes']} min" for n, f in a["finetunes"].items()) + "\n\n" + part_a_table(a))
    for key, title in (("b", "(b) Synthea CSV -> FHIR"), ("c", "(c) simulator model on the MIMIC-IV demo")):
        if key in results:
            same = results[key].get("same_people_same_split")
            text += (f"\n{title}; splits {results[key]['splits']}"
                     + ("" if same is None else f"; every patient in the same split in both: {same}")
                     + "\n\n" + next_event_table(results[key]))
    return text + "\nWhere the target's events lost their exact code (held-out split):\n\n" + vocabulary_table(results)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--lives", type=int, default=10_000, help="lives in the source and in the target cohort")
    ap.add_argument("--cohort-seed", type=int, default=1, help="the source simulation's seed (bench/quality.py's)")
    ap.add_argument("--target-seed", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1600, help="source training steps (8 rows x context per step)")
    ap.add_argument("--ft-subjects", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--ft-epochs", type=float, default=3.0, help="fine-tuning passes over the N subjects' tokens")
    ap.add_argument("--ft-min-steps", type=int, default=30)
    ap.add_argument("--ft-max-steps", type=int, default=120)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--tasks", nargs="*", default=["admission_30d"], help="tasks at discharges")
    ap.add_argument("--admission-tasks", nargs="*", default=["in_hospital_mortality"],
                    help="tasks at admissions (los_over_7d, icu_during_stay: each adds a scoring's worth of futures)")
    ap.add_argument("--rows", nargs="+", default=["in-source", "zero-shot", "finetune"],
                    choices=["in-source", "zero-shot", "finetune"], help="(a)'s rows to compute (others: from cache)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--max-points", type=int, default=600)
    ap.add_argument("--next-event-rows", type=int, default=200)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--min-subjects", type=int, default=10, help="tokenizer floor for the simulated cohorts")
    ap.add_argument("--small-min-subjects", type=int, default=2, help="tokenizer floor for Synthea and MIMIC")
    ap.add_argument("--small-steps", type=int, default=300, help="training steps of the Synthea CSV model")
    ap.add_argument("--workers", type=int, default=1, help="simulator processes")
    ap.add_argument("--force", action="store_true", help="redo the scorings (cohorts and models stay cached)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "shift")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    results: dict[str, Any] = {"command": "python bench/shift.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if "a" in args.parts:
        results["a"] = part_a(args)
    if "b" in args.parts:
        results["b"] = part_b(args)
    if "c" in args.parts:
        results["c"] = part_c(args, source_model(args)[1])
    results["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    md = markdown(results, args) + f"\nWall time {results['minutes']} min.\n"
    (args.out / "shift.md").write_text(md)
    (args.out / "shift.json").write_text(json.dumps(strip(results), indent=1, default=str))
    print(md)
    return results


if __name__ == "__main__":
    main()
