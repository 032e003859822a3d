"""Verified, resumable checkpoints under ``out/checkpoints/``.

- **Resumable to the bit.** A checkpoint holds DeepSpeed's model/optimiser state, the step, the epoch row counts
  of the row stream and every rank's python/numpy/torch RNG state; a killed run resumed from it reproduces the
  uninterrupted loss curve exactly (fp32, same world size).
- **Verified.** ``step_XXXXXXXX/`` gets a manifest (file sizes, sha256) written after every rank finished
  saving; ``latest`` is replaced atomically only then. A kill while saving leaves the previous checkpoint as the
  latest; a damaged file is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from foresight.atomic import write_text
from foresight.hashing import sha256_file
from foresight.train.config import TrainConfig
from foresight.train.errors import CheckpointError, TrainingError

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "foresight_checkpoint.json"


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, rank: int,
                    world_size: int, keep: int) -> Path:
    """Every rank saves its part; rank 0 then writes the manifest and, last, the ``latest`` pointer."""
    import torch
    import torch.distributed as dist

    tag = f"step_{step:08d}"
    path = ckpt_dir / tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(path.iterdir())
                 if p.is_file() and p.name != MANIFEST}
        manifest = {"step": step, "world_size": world_size, "files": files,
                    "saved": datetime.now(UTC).isoformat(timespec="seconds")}
        write_text(path / MANIFEST, json.dumps(manifest, indent=1))
        write_text(ckpt_dir / "latest", tag)  # the same pointer file DeepSpeed's own tools read
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name != tag)
        for p in old[:max(0, len(old) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when there is none."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not tag:
        raise CheckpointError(f"{pointer}: empty pointer file")
    return ckpt_dir / tag


def find_checkpoint(out: Path, *, resume: bool) -> Path | None:
    """The checkpoint a run in ``out`` continues from (None: a fresh start).

    Without ``resume`` an ``out`` that already holds checkpoints is refused, so a run is never overwritten by
    accident.
    """
    ckpt_dir = out / CHECKPOINT_DIR
    latest = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if latest is not None and not resume:
        raise TrainingError(f"{out} already holds checkpoints ({latest}); pass --resume to continue that run or "
                            "choose another --out")
    return latest


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest (every file present, same size, same sha256); returns it."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory is missing")
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: no {MANIFEST}: the checkpoint was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for name, meta in files.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest says {meta['bytes']} "
                                  "(truncated or overwritten)")
        if sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: contents differ from the manifest's sha256 (corrupted)")
    return manifest


def load_checkpoint(engine: Any, path: Path, *, rank: int, world_size: int) -> dict[str, Any]:
    """Verify, then restore model, optimiser and this rank's RNG state; returns the client state."""
    import torch

    manifest = verify_checkpoint(path)
    stage = engine.zero_optimization_stage()
    if manifest["world_size"] != world_size and stage > 0:
        raise CheckpointError(f"{path}: saved by {manifest['world_size']} ranks, resumed with {world_size}; ZeRO "
                              f"stage {stage} shards optimiser state per rank, so resume with the same world size")
    try:
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    except Exception as exc:  # DeepSpeed/torch raise many types here; say which checkpoint and why
        raise CheckpointError(f"{path}: DeepSpeed could not load it: {type(exc).__name__}: {exc}") from exc
    if load_path is None or client_state is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():  # a different world size: ranks without a saved state keep their fresh one
        try:
            _set_rng_state(torch.load(rng, weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"{rng}: cannot restore the RNG state: {exc}") from exc
    return client_state


def resume_checkpoint(engine: Any, path: Path, cfg: TrainConfig, fingerprint: str, data_dir: Path, *, rank: int,
                      world_size: int) -> dict[str, Any]:
    """Load ``path`` (:func:`load_checkpoint`) and check it belongs to this run: the options that decide the data
    order and the model (:attr:`TrainConfig.MUST_MATCH_ON_RESUME`) and the data fingerprint. Returns the client
    state (``step``, ``epoch_rows``, ``train_config``, ``data_fingerprint``)."""
    state = load_checkpoint(engine, path, rank=rank, world_size=world_size)
    saved_cfg = state.get("train_config", {})
    defaults = TrainConfig()
    for key in TrainConfig.MUST_MATCH_ON_RESUME:
        # an option added since the checkpoint was saved had its default then; tuples may come back as lists
        saved, wanted = saved_cfg.get(key, getattr(defaults, key)), getattr(cfg, key)
        if _comparable(saved) != _comparable(wanted):
            raise CheckpointError(f"{path}: was trained with {key}={saved!r}, this run asks "
                                  f"for {getattr(cfg, key)!r}")
    if state.get("data_fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: was trained on data with fingerprint {state.get('data_fingerprint')}, "
                              f"{data_dir} has {fingerprint}")
    return state


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
