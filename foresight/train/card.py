"""The trained model's directory: Hugging Face weights, ``vocab.json``, ``foresight.json`` (the model card) and
``loss_curve.png``.

A save is never half-visible: ``write_model_dir`` first drops the marker ``.incomplete`` into the directory, writes
every file into a staging folder beside them and moves each into place with ``os.replace`` (so no file is ever
truncated), and removes the marker last. A directory that still holds the marker — a save killed part-way, new
weights beside an old card — is refused by every reader (:func:`check_complete`, which
``Forecaster.from_pretrained`` and the release call); training again with the same options resumes and saves it.

``foresight.json`` holds the tokenizer, data fingerprint, training and DeepSpeed config, metrics, the time-head
flag, every rank's weight checksum and the data's provenance (``provenance``: the data-use purpose the tokens were
made for and every load that reached the model, with its provider, allowed purposes, input checksums, opt-out list
digest and date; see :mod:`foresight.purposes`); the model itself loads with
``AutoModelForCausalLM.from_pretrained(out)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from foresight import model as M
from foresight.atomic import fsync_dir, fsync_file
from foresight.hashing import sha256_chunks
from foresight.purposes import PurposeError, check_recorded
from foresight.train.engine import Run
from foresight.train.errors import TrainingError
from foresight.train.log import plot_loss_curve

CARD = "foresight.json"
INCOMPLETE = ".incomplete"  # present while a model directory is written; readers refuse a directory holding it
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_complete(model_dir: str | Path) -> None:
    """FileNotFoundError, saying why, when ``model_dir`` holds a save that did not finish."""
    if (Path(model_dir) / INCOMPLETE).exists():
        raise FileNotFoundError(f"{model_dir}: not a complete model: its save was interrupted ({INCOMPLETE} is "
                                "still there); run `foresight train` again with the same options to resume and save")


def check_provenance(data_dir: str | Path) -> dict[str, Any]:
    """The token folder's recorded purpose and loads, re-checked today (:func:`foresight.purposes.check_recorded`):
    :class:`TrainingError` naming the folder when there is no record or its loads no longer cover its purpose."""
    vocab = Path(data_dir) / "vocab.json"
    try:
        record = (json.loads(vocab.read_text()).get("report") or {}).get("provenance")
        return check_recorded(record, str(data_dir))
    except (OSError, ValueError) as exc:  # PurposeError is a ValueError
        raise TrainingError(str(exc) if isinstance(exc, PurposeError) else f"{vocab}: unreadable: {exc}") from exc


def gather_weights(run: Run) -> tuple[dict[str, Any] | None, list[str | None]]:
    """Collective (every rank calls it): the full state dict to save under ZeRO-3 (None below it) and every rank's
    weight checksum, which must agree (None each under ZeRO-3, where no rank holds all the weights)."""
    import torch.distributed as dist

    engine = run.engine
    # ZeRO-3 shards the weights: gather them (a collective, every rank takes part) for rank 0 to save
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None
    checksums: list[str | None] = [None] * run.world
    digest = None
    if engine.zero_optimization_stage() < 3:  # every rank holds the full weights: they must be identical
        # hashed tensor by tensor, never a copy of the whole model at once
        digest = sha256_chunks(p.detach().float().cpu().numpy().tobytes() for p in engine.module.parameters())
    dist.all_gather_object(checksums, digest)
    if digest is not None and len(set(checksums)) != 1:
        raise TrainingError(f"ranks ended with different weights ({checksums}); data-parallel sync is broken")
    return state_dict, checksums


def model_card(run: Run, metrics: dict[str, Any], checksums: list[str | None]) -> dict[str, Any]:
    """The contents of ``foresight.json``."""
    cfg, vocab = run.cfg, run.vocab
    n_events = int(vocab.is_event.sum())
    return {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "preset": M.describe(cfg.preset),
        "parameters": run.n_params,
        "tokenizer": {"vocab": "vocab.json", "vocab_size": len(vocab.tokens), "config": asdict(vocab.config),
                      "special_tokens": {t: vocab.index[t] for t in ("[PAD]", "[BOS]", "[END]")}},
        "data": {"dir": str(run.data_dir.resolve()), "fingerprint": vocab.fingerprint, "seq_len": cfg.seq_len,
                 "train_tokens": run.train_split.n_tokens, "tuning_tokens": run.tuning_split.n_tokens},
        "training": asdict(cfg),
        "deepspeed": run.ds_cfg,
        "world_size": run.world,
        "device": run.device_name,
        "precision": run.precision,
        "time_head": {"enabled": cfg.time_head, "weight": cfg.time_loss_weight, "unit": "days",
                      "event_tokens": n_events, "log_rate_offset": float(np.log(max(n_events, 1))),
                      "loss": "joint per-token NLL: (sum CE + weight * sum exponential gap NLL) / tokens"},
        "metrics": metrics,
        "rank_weight_checksums": checksums,
        "provenance": provenance(vocab.report.get("provenance")),
    }


def provenance(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model card's provenance block: the token folder's record (purpose, when it was checked, every load
    with provider, purposes, input checksums, opt-out list digest and load date)."""
    if record is None:
        return None
    return {"purpose": record.get("purpose"), "checked_on": record.get("checked_on"), "rule": record.get("rule"),
            "loads": [dict(lp) for lp in record.get("loads", [])]}


def write_model_dir(run: Run, state_dict: dict[str, Any] | None, checksums: list[str | None],
                    metrics: dict[str, Any], history: list[dict[str, Any]], unigram: float) -> None:
    """Rank 0 only: the weights, the vocabulary (and code descriptions), ``foresight.json`` and the loss curve,
    written so that a killed save leaves a directory readers refuse (see the module docstring)."""
    out, data_dir = run.out, run.data_dir
    marker = out / INCOMPLETE
    marker.write_text("a model save is in progress or was interrupted: the files here are not one model\n")
    fsync_dir(out)
    for stale in out.glob(".saving-*"):  # a killed save's staging folder
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=out))
    try:
        run.engine.module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        shutil.copyfile(data_dir / "vocab.json", staging / "vocab.json")
        if (data_dir / "code_descriptions.json").exists():  # readable names for predictions and the model card
            shutil.copyfile(data_dir / "code_descriptions.json", staging / "code_descriptions.json")
        (staging / CARD).write_text(json.dumps(model_card(run, metrics, checksums), indent=1, default=str))
        plot_loss_curve(history, staging / "loss_curve.png", unigram)
        new = {p.name for p in staging.iterdir()}
        for old in out.iterdir():  # a previous save's weight shards or descriptions would pass for this model's
            if old.is_file() and old.name not in new and (old.suffix in _WEIGHT_SUFFIXES
                                                          or old.name == "code_descriptions.json"):
                old.unlink()
        for p in sorted(staging.iterdir(), key=lambda p: p.name == CARD):  # the card last
            fsync_file(p)
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(out)
    marker.unlink()
    fsync_dir(out)
