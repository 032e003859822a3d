"""The audit: run every probe on a model and the data it was trained on, decide, and write the report.

``audit(model_dir, data_dir, out_dir)`` -> the report dict, written as ``report.json`` + ``report.html`` to
``out_dir`` and to ``model_dir/privacy/`` (where ``foresight release`` looks for the latest audit). Probes, in
order: vocabulary floor (:mod:`privacy.vocab_floor`), membership inference (:mod:`privacy.mia`), canary exposure
(:mod:`privacy.canaries`), extraction (:mod:`privacy.extraction`), synthetic-cohort distances
(:mod:`privacy.synthetic`) and, given opted-out subjects and a warehouse that still holds them, the forgotten-set
check. The decision is :func:`privacy.gate.decide`'s. This module only wires data to the probes: the maths lives
in :mod:`privacy.metrics` and the probe modules, the model forward in :mod:`privacy.scoring`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from privacy import canaries, extraction, gate, mia, release, report, scoring, synthetic, vocab_floor

SPLIT_SUFFIXES = ("bin", "clock.bin", "index.npy")


class AuditError(Exception):
    """The audit cannot run (wrong data for the model, missing files); the message says why."""


def audit(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path | None = None, *,
          config: str | Path | dict[str, Any] | None = None, reference: str | Path | None = None,
          train_reference: bool = False, db: str | Path | None = None, forgotten: Iterable[int] | None = None,
          synthetic_samples: int | None = None, progress: Callable[[str], None] | None = None,
          device: str | None = None) -> dict[str, Any]:
    """Audit ``model_dir`` against ``data_dir`` (the tokenized data it was trained on) and write the report.

    ``reference``: a model trained on disjoint subjects for the reference-calibrated attack (reused), or
    ``train_reference`` to train one on the tuning split with the target's settings. ``forgotten`` (subject ids)
    with ``db`` (a warehouse that still holds them) adds the forgotten-set check. ``synthetic_samples``
    overrides the config's number of generated timelines (0 skips that probe). ``device``: where the model runs
    (e.g. ``cuda``; default CPU).
    """
    from foresight.dataset import PackedSplit
    from foresight.forecast import Forecaster
    from foresight.tokens import Vocabulary

    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    cfg = gate.load_config(config)
    if synthetic_samples is not None:
        cfg["synthetic"]["samples"] = int(synthetic_samples)
    seed, n_boot, level = cfg["audit"]["seed"], cfg["audit"]["bootstrap"], cfg["audit"]["ci_level"]
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    if forgotten and db is None:  # say so before any work is done
        raise AuditError("the forgotten-set check needs --db: a warehouse that still holds those subjects")

    # ---- the model and the data it was trained on
    checksum, files = release.model_checksum(model_dir)
    fc = Forecaster.from_pretrained(model_dir, device=device)
    model, vocab, meta = fc.model, fc.vocab, fc.meta
    if not (data_dir / "vocab.json").exists():
        raise AuditError(f"{data_dir}: no vocab.json (not a tokenized data directory)")
    data_vocab = Vocabulary.load(data_dir / "vocab.json")
    if data_vocab.tokens != vocab.tokens:
        raise AuditError(f"{data_dir}: its vocabulary differs from the model's: audit the model against the data "
                         "directory it was trained on")
    train = PackedSplit(data_dir, "train", vocab=data_vocab)
    held = PackedSplit(data_dir, "held_out", vocab=data_vocab)
    trained_on = (meta.get("data") or {}).get("train_tokens")
    if trained_on is not None and int(trained_on) != train.n_tokens:
        raise AuditError(f"{data_dir}: its train split has {train.n_tokens:,} tokens, the model was trained on "
                         f"{int(trained_on):,}: audit against the data directory it was trained on (with its "
                         "canaries, if any)")
    context = scoring.context_length(meta, model)
    manifest = canaries.load_manifest(data_dir)
    canary_ids = canaries.canary_subject_ids(manifest)
    is_canary = np.isin(train.index["subject_id"], np.array(sorted(canary_ids), dtype=np.int64))
    real_train = np.flatnonzero(~is_canary)

    # ---- vocabulary floor
    t = time.perf_counter()
    say("vocabulary floor: recounting train subjects per token")
    counts = mia.token_subject_counts(train, canary_ids)
    vf = vocab_floor.check(vocab, counts, cfg["vocab_floor"]["min_subjects"], cfg["slices"]["sensitive"])
    times["vocabulary_floor"] = time.perf_counter() - t

    # ---- membership inference
    t = time.perf_counter()
    mem_idx, non_idx = mia.balanced_sample(real_train, np.arange(len(held)), cfg["audit"]["max_subjects_per_side"],
                                           seed)
    say(f"membership inference: scoring {len(mem_idx)} members and {len(non_idx)} non-members")
    ref_model, ref_name = None, None
    if reference is not None:
        ref_fc = Forecaster.from_pretrained(reference, device=device)
        if ref_fc.vocab.tokens != vocab.tokens:
            raise AuditError(f"{reference}: the reference model's vocabulary differs from the target's")
        ref_model, ref_name = ref_fc.model, str(reference)
    elif train_reference:
        where = Path(out_dir) if out_dir else model_dir / release.REPORT_DIR
        ref_dir = train_reference_model(data_dir, where / "reference_model", meta, real_train_tokens=int(
            train.index["length"][real_train].sum()), progress=say)
        ref_model, ref_name = Forecaster.from_pretrained(ref_dir, device=device).model, str(ref_dir)
    mia_rows, roc = [], {}
    if len(mem_idx) and len(non_idx):
        k = cfg["mia"]["min_k"]
        sc_m = _attack_scores(model, ref_model, train, mem_idx, context, k)
        sc_n = _attack_scores(model, ref_model, held, non_idx, context, k)
        sl_m = mia.slice_membership(train, mem_idx, counts, cfg["slices"])
        sl_n = mia.slice_membership(held, non_idx, counts, cfg["slices"])
        mia_rows = mia.evaluate(sc_m, sc_n, sl_m, sl_n, alphas=tuple(cfg["mia"]["report_fprs"]), n_boot=n_boot,
                                level=level, seed=seed, min_slice=cfg["mia"]["min_slice_subjects"])
        roc = {a: mia.roc_points(sc_m[a], sc_n[a]) for a in sc_m}
    times["membership_inference"] = time.perf_counter() - t

    # ---- canaries
    t = time.perf_counter()
    can = None
    if manifest is not None:
        say(f"canaries: {len(manifest['canaries'])} canaries against {len(manifest['references'])} references")
        cc = cfg["canaries"]
        can = canaries.exposure(model, vocab, manifest, context, alpha=cc["alpha"],
                                validity_repeats=cc["validity_repeats"], detect_share=cc["detect_share"])
    times["canaries"] = time.perf_counter() - t

    # ---- extraction
    t = time.perf_counter()
    xc = cfg["extraction"]
    say(f"extraction: prompts of k = {xc['ks']} events, greedy and sampled")
    ex = extraction.run(model, vocab, train, held, context=context, member_ok=~is_canary,
                        nonmember_ok=np.ones(len(held), bool), ks=tuple(xc["ks"]), max_pairs=xc["max_pairs"],
                        seed=seed, max_new_tokens=xc["max_new_tokens"], eidetic_k=xc["eidetic_k"], n_boot=n_boot,
                        level=level)
    times["extraction"] = time.perf_counter() - t

    # ---- synthetic cohort
    t = time.perf_counter()
    syn = None
    sc = cfg["synthetic"]
    if sc["samples"] > 0 and len(held) and len(real_train):
        say(f"synthetic cohort: generating {sc['samples']} timelines")
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(held), size=sc["samples"], replace=sc["samples"] > len(held))
        prompts = [held.subject_tokens(int(i))[:int(held.index[int(i)]["prefix_len"])] for i in picks]
        gen = synthetic.sample_timelines(model, vocab, prompts, max_tokens=min(sc["max_tokens"], context),
                                         seed=seed)
        limit = min(sc["max_tokens"], context)
        codes = lambda split, i: synthetic.code_sequence(split.subject_tokens(int(i)), fc.is_event, limit)  # noqa: E731
        cap = cfg["audit"]["max_subjects_per_side"]
        sample = lambda idx: idx if len(idx) <= cap else rng.choice(idx, size=cap, replace=False)  # noqa: E731
        syn = synthetic.check([synthetic.code_sequence(g, fc.is_event, limit) for g in gen],
                              [codes(train, i) for i in sample(real_train)],
                              [codes(held, i) for i in sample(np.arange(len(held)))],
                              len(vocab.tokens), copy_k=sc["copy_k"], seed=seed, n_boot=n_boot, level=level,
                              train_counts=synthetic.sequence_counts(codes(train, i) for i in real_train),
                              holdout_seen=set(synthetic.sequence_counts(codes(held, i) for i in range(len(held)))))
    times["synthetic_cohort"] = time.perf_counter() - t

    # ---- forgotten subjects
    t = time.perf_counter()
    forg = None
    if forgotten:
        forg = forgotten_check(model, vocab, list(forgotten), db, train, held, non_idx, context, cfg, ref_model)
        say(f"forgotten subjects: {forg['subjects']} scored")
    times["forgotten"] = time.perf_counter() - t

    # ---- decision and report
    results = {"membership_inference": mia_rows, "canaries": can, "extraction": ex, "vocabulary_floor": vf,
               "synthetic_cohort": syn, "forgotten": forg}
    decision = gate.decide(results, cfg)
    times["total"] = time.perf_counter() - t_start
    tr = meta.get("training") or {}
    rep = {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "decision": decision["decision"],
        "valid": decision["valid"],
        "reasons": decision["reasons"],
        "model": {
            "name": model_dir.resolve().name, "dir": str(model_dir.resolve()), "checksum": checksum, "files": files,
            "preset": (meta.get("preset") or {}).get("name"), "parameters": meta.get("parameters"),
            "training": {k: tr[k] for k in ("max_steps", "lr", "min_lr", "weight_decay", "seq_len", "micro_batch",
                                             "grad_accum", "seed", "time_head") if k in tr},
            "metrics": {k: v for k, v in (meta.get("metrics") or {}).items()
                        if k in ("train_loss", "tuning_loss", "unigram_entropy_tuning", "steps", "tokens_seen")},
            "context": context,
        },
        "data": {
            "dir": str(data_dir.resolve()), "fingerprint": data_vocab.fingerprint,
            "subjects": {"train": len(real_train), "held_out": len(held)},
            "tokens": {"train": int(train.index["length"][real_train].sum()), "held_out": held.n_tokens},
            "canaries": None if manifest is None else {k: manifest[k] for k in ("repeats", "per_repeat",
                                                                                  "canary_subjects", "seed")},
            "vocab_size": len(vocab.tokens), "vocab_floor": int(data_vocab.config.min_subjects),
            "opt_out": data_vocab.report.get("opt_out"),
        },
        "config": cfg,
        "probes": {
            "membership_inference": {"members": len(mem_idx), "nonmembers": len(non_idx), "reference": ref_name,
                                     "rows": mia_rows},
            "canaries": can, "extraction": ex, "vocabulary_floor": vf, "synthetic_cohort": syn,
            "forgotten": forg,
        },
        "gate": decision,
        "runtime_seconds": {k: round(v, 3) for k, v in times.items()},
    }
    plots = {}
    if roc:
        plots["roc"] = report.plot_roc(roc)
    if can:
        plots["exposure"] = report.plot_exposure(can)
    targets = [model_dir / release.REPORT_DIR]
    if out_dir is not None and Path(out_dir).resolve() != targets[0].resolve():
        targets.insert(0, Path(out_dir))
    rep["written"] = [str(p) for p in report.write(rep, targets, plots)]
    return rep


def _attack_scores(model: Any, ref_model: Any | None, split: Any, idx: np.ndarray, context: int,
                   k: float) -> dict[str, np.ndarray]:
    """Every membership attack's score for the subjects ``idx`` of ``split`` (reference-calibrated ones only
    when a reference model is given)."""
    stats = scoring.score_subjects(model, split, idx, context)
    ref = scoring.score_subjects(ref_model, split, idx, context) if ref_model else [None] * len(idx)
    return _stack([mia.attack_scores(s, r, k) for s, r in zip(stats, ref, strict=True)])


def _stack(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}


def train_reference_model(data_dir: Path, out: Path, meta: dict[str, Any], *, real_train_tokens: int,
                          progress: Callable[[str], None]) -> Path:
    """Train a reference model on the tuning split (subjects disjoint from train and held-out) with the target's
    settings, its steps scaled to the same number of epochs. Returns its directory (reused if already there)."""
    from foresight import train as T
    from foresight.dataset import PackedSplit

    model_out = out / "model"
    if (model_out / "config.json").exists():
        return model_out
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_dir / "vocab.json", data / "vocab.json")
    for suffix in SPLIT_SUFFIXES:
        for target in ("train", "tuning"):
            shutil.copyfile(data_dir / f"tuning.{suffix}", data / f"{target}.{suffix}")
    tuning_tokens = PackedSplit(data, "tuning").n_tokens
    fields = dict(meta.get("training") or {})
    if not fields:
        raise AuditError("the model's foresight.json has no training settings to train a reference model with")
    steps = max(20, round(int(fields["max_steps"]) * tuning_tokens / max(1, real_train_tokens)))
    fields.update(max_steps=steps, warmup_steps=min(int(fields.get("warmup_steps", 0)), max(1, steps // 10)),
                  eval_every=0, eval_rows=min(int(fields.get("eval_rows", 8)) or 8, 8), checkpoint_every=0,
                  stop_at_step=0)
    progress(f"training a reference model on the tuning split ({tuning_tokens:,} tokens, {steps} steps)")
    T.train(data, model_out, T.TrainConfig.from_dict(fields))
    shutil.rmtree(model_out / T.CHECKPOINT_DIR, ignore_errors=True)  # optimiser state is not needed to score
    return model_out


def forgotten_check(model: Any, vocab: Any, subject_ids: list[int], db: str | Path, train: Any, held: Any,
                    non_idx: np.ndarray, context: int, cfg: dict[str, Any], ref_model: Any | None) -> dict[str, Any]:
    """Membership inference with the opted-out subjects as members (encoded from ``db`` with the model's
    vocabulary) against held-out non-members: a model never trained on them cannot tell them apart."""
    from foresight import warehouse
    from foresight.dataset import PackedSplit

    in_train = int(np.isin(train.index["subject_id"], np.array(subject_ids, dtype=np.int64)).sum())
    with tempfile.TemporaryDirectory(prefix="foresight-forgotten-") as tmp:
        con = warehouse.connect(db, read_only=True)
        try:
            n = encode_to_split(con, vocab, subject_ids, Path(tmp), "forgotten")
        finally:
            con.close()
        if n == 0:
            return {"subjects": 0, "in_training_data": in_train, "rows": [
                {"slice": "all", "measured": False, "members": 0, "nonmembers": len(non_idx),
                 "why": "none of the listed subjects has events in the warehouse"}]}
        split = PackedSplit(tmp, "forgotten", vocab=vocab)
        idx, non = mia.balanced_sample(np.arange(len(split)), non_idx, cfg["audit"]["max_subjects_per_side"],
                                       cfg["audit"]["seed"])
        k = cfg["mia"]["min_k"]
        sf = _attack_scores(model, ref_model, split, idx, context, k)
        sn = _attack_scores(model, ref_model, held, non, context, k)
        rows = mia.evaluate(sf, sn, None, None, alphas=tuple(cfg["mia"]["report_fprs"]),
                            n_boot=cfg["audit"]["bootstrap"], level=cfg["audit"]["ci_level"],
                            seed=cfg["audit"]["seed"], min_slice=min(cfg["mia"]["min_slice_subjects"], 5))
    return {"subjects": n, "in_training_data": in_train, "rows": rows}


def encode_to_split(con: Any, vocab: Any, subject_ids: list[int], out: Path, name: str) -> int:
    """Encode subjects from a warehouse with a given vocabulary into ``out/<name>.*`` shard files (the
    :func:`foresight.tokens.tokenize` layout); returns how many subjects had events."""
    from foresight.tokens import INDEX_DTYPE, MINUTE, NO_TIME, _first_markers, encode_subjects, register_code_map

    ids = sorted(set(int(s) for s in subject_ids))
    register_code_map(con, vocab)
    con.execute("CREATE OR REPLACE TEMP TABLE privacy_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id", [ids])
    chunk = encode_subjects(con, vocab, ids[0], ids[-1], cohort_table="privacy_cohort")
    t0 = np.repeat(np.where(chunk.t0_s == NO_TIME, 0, chunk.t0_s), np.diff(chunk.offsets))
    chunk.tokens.astype(vocab.dtype).tofile(out / f"{name}.bin")
    ((chunk.clock_s - t0) // MINUTE).astype(np.int32).tofile(out / f"{name}.clock.bin")
    idx = np.zeros(len(chunk.subject_ids), dtype=INDEX_DTYPE)
    idx["subject_id"] = chunk.subject_ids
    idx["offset"] = chunk.offsets[:-1]
    idx["length"] = np.diff(chunk.offsets)
    idx["prefix_len"] = chunk.prefix_lens
    idx["head_len"] = chunk.prefix_lens - _first_markers(vocab, chunk)
    idx["t0"] = chunk.t0_s
    idx["birth"] = chunk.birth_s
    np.save(out / f"{name}.index.npy", idx)
    return len(idx)
