"""The audit: run every probe on a model and the data it was trained on, decide, and write the report.

``audit(model_dir, data_dir, out_dir)`` -> the report dict, written as ``report.json`` + ``report.html`` to
``out_dir`` and to ``model_dir/privacy/`` (where ``foresight release`` looks for the latest audit). Probes, in
order: vocabulary floor (:mod:`privacy.vocab_floor`), membership inference (:mod:`privacy.mia`), canary exposure
(:mod:`privacy.canaries`), extraction (:mod:`privacy.extraction`), synthetic-cohort distances
(:mod:`privacy.synthetic`), sensitive attributes read from embeddings (:mod:`privacy.embedding_probe`, unless
``[embedding_probe] enabled = false``) and, given opted-out subjects and a warehouse that still holds them, the
forgotten-set check. The decision is :func:`privacy.gate.decide`'s. This module only wires data to the probes: the
maths lives in :mod:`privacy.metrics` and the probe modules, the model forward in :mod:`privacy.scoring`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from foresight import train as T
from foresight import warehouse
from foresight.dataset import PackedSplit
from foresight.forecast import Forecaster
from foresight.tokens import Vocabulary, check_complete, encode_subjects, register_code_map, seal, write_shard
from foresight.train.card import INCOMPLETE
from privacy import (
    canaries,
    embedding_probe,
    extraction,
    gate,
    mia,
    release,
    report,
    scoring,
    signing,
    synthetic,
    vocab_floor,
)

SPLIT_SUFFIXES = ("bin", "clock.bin", "index.npy")


class AuditError(Exception):
    """The audit cannot run (wrong data for the model, missing files); the message says why."""


@dataclass
class AuditInputs:
    """The model under audit and the tokenized data it was trained on, checked to belong together."""

    model_dir: Path
    data_dir: Path
    fc: Forecaster
    data_vocab: Vocabulary
    train: PackedSplit
    held: PackedSplit
    context: int
    manifest: dict[str, Any] | None  # the planted canaries, if any
    is_canary: np.ndarray  # (train subjects,) bool
    real_train: np.ndarray  # indices of train subjects that are not canaries
    checksum: str
    files: dict[str, str]


class _Timer:
    """Seconds per probe, for the report's runtime section."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t


def audit(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path | None = None, *,
          config: str | Path | dict[str, Any] | None = None, reference: str | Path | None = None,
          train_reference: bool = False, db: str | Path | None = None, forgotten: Iterable[int] | None = None,
          synthetic_samples: int | None = None, progress: Callable[[str], None] | None = None,
          device: str | None = None, signing_key: str | Path | None = None) -> dict[str, Any]:
    """Audit ``model_dir`` against ``data_dir`` (the tokenized data it was trained on) and write the report.

    ``reference``: a model trained on disjoint subjects for the reference-calibrated attack (reused), or
    ``train_reference`` to train one on the tuning split with the target's settings. ``forgotten`` (subject ids)
    with ``db`` (a warehouse that still holds them) adds the forgotten-set check. ``synthetic_samples``
    overrides the config's number of generated timelines (0 skips that probe). ``device``: where the model runs
    (e.g. ``cuda``; default CPU). ``signing_key``: an Ed25519 key file (``foresight keys init``) that signs each
    written report (``report.sig.json`` beside it, :func:`sign_reports`); without one, no report is signed.
    """
    say = progress or (lambda _m: None)
    signer = _signer(signing_key)  # a bad key fails now, not after the probes
    timer = _Timer()
    cfg = gate.load_config(config)
    if synthetic_samples is not None:
        cfg["synthetic"]["samples"] = int(synthetic_samples)
    if forgotten and db is None:  # say so before any work is done
        raise AuditError("the forgotten-set check needs --db: a warehouse that still holds those subjects")
    inp = load_inputs(Path(model_dir), Path(data_dir), device)
    with timer("vocabulary_floor"):
        say("vocabulary floor: recounting train subjects per token")
        counts = mia.token_subject_counts(inp.train, canaries.canary_subject_ids(inp.manifest))
        vf = vocab_floor.check(inp.fc.vocab, counts, cfg["vocab_floor"]["min_subjects"], cfg["slices"]["sensitive"])
    with timer("membership_inference"):
        mem_idx, non_idx = mia.balanced_sample(inp.real_train, np.arange(len(inp.held)),
                                               cfg["audit"]["max_subjects_per_side"], cfg["audit"]["seed"])
        say(f"membership inference: scoring {len(mem_idx)} members and {len(non_idx)} non-members")
        ref_model, ref_name = _reference_model(inp, reference, train_reference, out_dir, device, say)
        membership = _membership_inference(inp, cfg, counts, ref_model, mem_idx, non_idx)
    with timer("canaries"):
        can = _canary_exposure(inp, cfg, say)
    with timer("extraction"):
        ex = _extraction(inp, cfg, say)
    with timer("synthetic_cohort"):
        syn = _synthetic_cohort(inp, cfg, say)
    with timer("embedding_probe"):
        emb = _embedding_probe(inp, cfg, membership["mem_idx"], membership["non_idx"], say)
    with timer("forgotten"):
        forg = None
        if forgotten:
            forg = forgotten_check(inp.fc.model, inp.fc.vocab, list(forgotten), db, inp.train, inp.held,
                                   membership["non_idx"], inp.context, cfg, ref_model)
            say(f"forgotten subjects: {forg['subjects']} scored")
    results = {"membership_inference": membership["rows"], "canaries": can, "extraction": ex,
               "vocabulary_floor": vf, "synthetic_cohort": syn, "embedding_probe": emb, "forgotten": forg}
    decision = gate.decide(results, cfg)
    timer.times["total"] = time.perf_counter() - timer.start
    rep = _report(inp, cfg, decision, results, membership, ref_name, timer.times)
    plots = {}
    if membership["roc"]:
        plots["roc"] = report.plot_roc(membership["roc"])
    if can:
        plots["exposure"] = report.plot_exposure(can)
    targets = [inp.model_dir / release.REPORT_DIR]
    if out_dir is not None and Path(out_dir).resolve() != targets[0].resolve():
        targets.insert(0, Path(out_dir))
    rep["written"] = [str(p) for p in report.write(rep, targets, plots)]
    rep["signed"] = [str(p) for p in sign_reports(inp.model_dir, targets, signer)]
    return rep


def _signer(signing_key: str | Path | None) -> Any:
    try:
        return signing.load_private_key(signing_key) if signing_key is not None else None
    except signing.KeyFileError as exc:
        raise AuditError(str(exc)) from exc


def sign_reports(model_dir: Path, targets: list[Path], signer: Any) -> list[Path]:
    """Sign the ``report.json`` just written in each of ``targets`` (signing the file as written, so the model's
    files must still be the audited ones), or, without a ``signer``, remove a previous audit's signature there so
    that it cannot be taken for this report's."""
    sigs = [signing.signature_path(d / release.REPORT_JSON) for d in targets]
    if signer is None:
        for s in sigs:
            s.unlink(missing_ok=True)
        return []
    audited = json.loads((targets[0] / release.REPORT_JSON).read_text())["model"]["checksum"]
    if release.model_checksum(model_dir)[0] != audited:
        raise AuditError(f"{model_dir}: the model's files changed during the audit; not signed: audit it again")
    return [signing.sign_report(d / release.REPORT_JSON, signer) for d in targets]


def load_inputs(model_dir: Path, data_dir: Path, device: str | None) -> AuditInputs:
    """Load the model and its training data; AuditError when the data is not what the model was trained on."""
    checksum, files = release.model_checksum(model_dir)
    fc = Forecaster.from_pretrained(model_dir, device=device)
    if not (data_dir / "vocab.json").exists():
        raise AuditError(f"{data_dir}: no vocab.json (not a tokenized data directory)")
    check_complete(data_dir, "train")  # before its vocabulary is trusted: an unfinished folder mixes two runs
    data_vocab = Vocabulary.load(data_dir / "vocab.json")
    if data_vocab.tokens != fc.vocab.tokens:
        raise AuditError(f"{data_dir}: its vocabulary differs from the model's: audit the model against the data "
                         "directory it was trained on")
    # scored the way the model was trained: continuation pieces carry its history block, if it has one
    train = PackedSplit(data_dir, "train", vocab=data_vocab, history=fc.history)
    held = PackedSplit(data_dir, "held_out", vocab=data_vocab, history=fc.history)
    trained_on = (fc.meta.get("data") or {}).get("train_tokens")
    if trained_on is not None and int(trained_on) != train.n_tokens:
        raise AuditError(f"{data_dir}: its train split has {train.n_tokens:,} tokens, the model was trained on "
                         f"{int(trained_on):,}: audit against the data directory it was trained on (with its "
                         "canaries, if any)")
    manifest = canaries.load_manifest(data_dir)
    canary_ids = canaries.canary_subject_ids(manifest)
    is_canary = np.isin(train.index["subject_id"], np.array(sorted(canary_ids), dtype=np.int64))
    return AuditInputs(model_dir, data_dir, fc, data_vocab, train, held, scoring.context_length(fc.meta, fc.model),
                       manifest, is_canary, np.flatnonzero(~is_canary), checksum, files)


def _reference_model(inp: AuditInputs, reference: str | Path | None, train_reference: bool,
                     out_dir: str | Path | None, device: str | None,
                     say: Callable[[str], None]) -> tuple[Any | None, str | None]:
    """The reference model for the calibrated attacks: given, trained here on the tuning split, or none."""
    if reference is not None:
        ref_fc = Forecaster.from_pretrained(reference, device=device)
        if ref_fc.vocab.tokens != inp.fc.vocab.tokens:
            raise AuditError(f"{reference}: the reference model's vocabulary differs from the target's")
        return ref_fc.model, str(reference)
    if train_reference:
        where = Path(out_dir) if out_dir else inp.model_dir / release.REPORT_DIR
        ref_dir = train_reference_model(inp.data_dir, where / "reference_model", inp.fc.meta, real_train_tokens=int(
            inp.train.index["length"][inp.real_train].sum()), progress=say)
        return Forecaster.from_pretrained(ref_dir, device=device).model, str(ref_dir)
    return None, None


def _membership_inference(inp: AuditInputs, cfg: dict[str, Any], counts: Any, ref_model: Any | None,
                          mem_idx: np.ndarray, non_idx: np.ndarray) -> dict[str, Any]:
    """Every attack on a balanced sample of members and non-members: rows per slice, ROC points, the sample."""
    rows, roc = [], {}
    if len(mem_idx) and len(non_idx):
        k = cfg["mia"]["min_k"]
        sc_m = _attack_scores(inp.fc.model, ref_model, inp.train, mem_idx, inp.context, k)
        sc_n = _attack_scores(inp.fc.model, ref_model, inp.held, non_idx, inp.context, k)
        sl_m = mia.slice_membership(inp.train, mem_idx, counts, cfg["slices"])
        sl_n = mia.slice_membership(inp.held, non_idx, counts, cfg["slices"])
        rows = mia.evaluate(sc_m, sc_n, sl_m, sl_n, alphas=tuple(cfg["mia"]["report_fprs"]),
                            n_boot=cfg["audit"]["bootstrap"], level=cfg["audit"]["ci_level"],
                            seed=cfg["audit"]["seed"], min_slice=cfg["mia"]["min_slice_subjects"],
                            tpr_limits=cfg["mia"]["tpr_limits"],
                            min_false_positives=cfg["mia"]["min_false_positives"])
        roc = {a: mia.roc_points(sc_m[a], sc_n[a]) for a in sc_m}
    return {"rows": rows, "roc": roc, "mem_idx": mem_idx, "non_idx": non_idx}


def _canary_exposure(inp: AuditInputs, cfg: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any] | None:
    """Exposure of the planted canaries (None when the data has none)."""
    if inp.manifest is None:
        return None
    say(f"canaries: {len(inp.manifest['canaries'])} canaries against {len(inp.manifest['references'])} references")
    cc = cfg["canaries"]
    return canaries.exposure(inp.fc.model, inp.fc.vocab, inp.manifest, inp.context, alpha=cc["alpha"],
                             validity_repeats=cc["validity_repeats"], detect_share=cc["detect_share"])


def _extraction(inp: AuditInputs, cfg: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """Prompted extraction of members' continuations, greedy and sampled, against non-members."""
    xc = cfg["extraction"]
    say(f"extraction: prompts of k = {xc['ks']} events, greedy and sampled")
    return extraction.run(inp.fc.model, inp.fc.vocab, inp.train, inp.held, context=inp.context,
                          member_ok=~inp.is_canary, nonmember_ok=np.ones(len(inp.held), bool), ks=tuple(xc["ks"]),
                          max_pairs=xc["max_pairs"], seed=cfg["audit"]["seed"], max_new_tokens=xc["max_new_tokens"],
                          eidetic_k=xc["eidetic_k"], n_boot=cfg["audit"]["bootstrap"], level=cfg["audit"]["ci_level"])


def _synthetic_cohort(inp: AuditInputs, cfg: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any] | None:
    """Distances from generated timelines to train and held-out subjects (None when switched off)."""
    sc, seed = cfg["synthetic"], cfg["audit"]["seed"]
    train, held, real_train, is_event = inp.train, inp.held, inp.real_train, inp.fc.vocab.is_event
    if not (sc["samples"] > 0 and len(held) and len(real_train)):
        return None
    say(f"synthetic cohort: generating {sc['samples']} timelines")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(held), size=sc["samples"], replace=sc["samples"] > len(held))
    prompts = [held.subject_tokens(int(i))[:int(held.index[int(i)]["prefix_len"])] for i in picks]
    limit = min(sc["max_tokens"], inp.context)
    gen = synthetic.sample_timelines(inp.fc.model, inp.fc.vocab, prompts, max_tokens=limit, seed=seed)

    def codes(split: PackedSplit, i: Any) -> tuple[int, ...]:
        return synthetic.code_sequence(split.subject_tokens(int(i)), is_event, limit)

    cap = cfg["audit"]["max_subjects_per_side"]

    def sample(idx: np.ndarray) -> np.ndarray:
        return idx if len(idx) <= cap else rng.choice(idx, size=cap, replace=False)

    return synthetic.check([synthetic.code_sequence(g, is_event, limit) for g in gen],
                           [codes(train, i) for i in sample(real_train)],
                           [codes(held, i) for i in sample(np.arange(len(held)))],
                           len(inp.fc.vocab.tokens), copy_k=sc["copy_k"], seed=seed, n_boot=cfg["audit"]["bootstrap"],
                           level=cfg["audit"]["ci_level"],
                           train_counts=synthetic.sequence_counts(codes(train, i) for i in real_train),
                           holdout_counts=synthetic.sequence_counts(codes(held, i) for i in range(len(held))))


def _embedding_probe(inp: AuditInputs, cfg: dict[str, Any], mem_idx: np.ndarray, non_idx: np.ndarray,
                     say: Callable[[str], None]) -> dict[str, Any] | None:
    """Sensitive attributes read from embeddings, on membership inference's sample of members and non-members
    (None when switched off)."""
    if not cfg["embedding_probe"]["enabled"]:
        return None
    return embedding_probe.run(inp.fc, inp.train, inp.held, mem_idx, non_idx, cfg["embedding_probe"],
                               cfg["slices"]["sensitive"], seed=cfg["audit"]["seed"],
                               n_boot=cfg["audit"]["bootstrap"], level=cfg["audit"]["ci_level"], progress=say)


def _report(inp: AuditInputs, cfg: dict[str, Any], decision: dict[str, Any], results: dict[str, Any],
            membership: dict[str, Any], ref_name: str | None, times: dict[str, float]) -> dict[str, Any]:
    """The report.json content: decision, model, data, config, every probe's results and the runtimes."""
    meta, model_dir, manifest = inp.fc.meta, inp.model_dir, inp.manifest
    tr = meta.get("training") or {}
    probes = dict(results)
    probes["membership_inference"] = {"members": len(membership["mem_idx"]),
                                      "nonmembers": len(membership["non_idx"]), "reference": ref_name,
                                      "rows": results["membership_inference"]}
    return {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "decision": decision["decision"],
        "valid": decision["valid"],
        "reasons": decision["reasons"],
        "model": {
            "name": model_dir.resolve().name, "dir": str(model_dir.resolve()), "checksum": inp.checksum,
            "files": inp.files, "preset": (meta.get("preset") or {}).get("name"), "parameters": meta.get("parameters"),
            "training": {k: tr[k] for k in ("max_steps", "lr", "min_lr", "weight_decay", "seq_len", "micro_batch",
                                             "grad_accum", "seed", "time_head") if k in tr},
            "metrics": {k: v for k, v in (meta.get("metrics") or {}).items()
                        if k in ("train_loss", "tuning_loss", "unigram_entropy_tuning", "steps", "tokens_seen")},
            "context": inp.context,
        },
        "data": {
            "dir": str(inp.data_dir.resolve()), "fingerprint": inp.data_vocab.fingerprint,
            "subjects": {"train": len(inp.real_train), "held_out": len(inp.held)},
            "tokens": {"train": int(inp.train.index["length"][inp.real_train].sum()), "held_out": inp.held.n_tokens},
            "canaries": None if manifest is None else {k: manifest[k] for k in ("repeats", "per_repeat",
                                                                                  "canary_subjects", "seed")},
            "vocab_size": len(inp.fc.vocab.tokens), "vocab_floor": int(inp.data_vocab.config.min_subjects),
            "opt_out": inp.data_vocab.report.get("opt_out"),
            "provenance": inp.data_vocab.report.get("provenance"),  # foresight.purposes: loads, purposes
        },
        "config": cfg,
        "probes": probes,
        "gate": decision,
        "runtime_seconds": {k: round(v, 3) for k, v in times.items()},
    }


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
    model_out = out / "model"
    if (model_out / "config.json").exists() and not (model_out / INCOMPLETE).exists():  # not a killed save
        return model_out
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_dir / "vocab.json", data / "vocab.json")
    for suffix in SPLIT_SUFFIXES:
        for target in ("train", "tuning"):
            shutil.copyfile(data_dir / f"tuning.{suffix}", data / f"{target}.{suffix}")
    seal(data)  # the copy is a token folder of its own: readers check its completion marker
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
    in_train = int(np.isin(train.index["subject_id"], np.array(subject_ids, dtype=np.int64)).sum())
    with tempfile.TemporaryDirectory(prefix="foresight-forgotten-") as tmp:
        with warehouse.connect(db, read_only=True) as con:
            n = encode_to_split(con, vocab, subject_ids, Path(tmp), "forgotten")
        if n == 0:
            return {"subjects": 0, "in_training_data": in_train, "rows": [
                {"slice": "all", "measured": False, "members": 0, "nonmembers": len(non_idx),
                 "why": "none of the listed subjects has events in the warehouse"}]}
        split = PackedSplit(tmp, "forgotten", vocab=vocab, history=held.history)  # scored like the non-members
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
    ids = sorted(set(int(s) for s in subject_ids))
    register_code_map(con, vocab)
    con.execute("CREATE OR REPLACE TEMP TABLE privacy_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id", [ids])
    chunk = encode_subjects(con, vocab, ids[0], ids[-1], cohort_table="privacy_cohort")
    write_shard(vocab, chunk, out, name)
    return len(chunk.subject_ids)
