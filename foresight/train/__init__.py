"""The training loop: one readable file over ``deepspeed.initialize``, the same code on a laptop CPU and on GPUs.

Read it top to bottom: setup (distributed, device) -> data (a row stream that is a pure function of (seed,
step)) -> model (a Llama preset wrapped by DeepSpeed) -> ``estimate_loss()`` -> ``get_lr(it)`` -> the loop
(set LR, micro-steps with ``engine.backward(loss); engine.step()``, log, evaluate, checkpoint) -> save.

- **Precision and sharding come from the DeepSpeed JSON** (``deploy/deepspeed/*.json``): ZeRO stage, bf16 or
  fp32, CPU offload. Batch size, accumulation and clipping come from :class:`TrainConfig` (the JSON says
  ``"auto"``). fp32 or bf16 work on CPU; fp16 does not. Without a file: fp32 stage 0 on CPU, bf16 stage 1 on GPU.
- **The optimiser is a plain ``torch.optim.AdamW``** handed to DeepSpeed (nothing to compile, CPU runs start in
  seconds). A JSON ``optimizer`` section switches to DeepSpeed's own (needed for ZeRO-3 CPU offload).
- **The LR schedule is ours** (linear warm-up, cosine decay to ``min_lr``), written into the optimiser's param
  groups every step, so resuming needs only the step number.
- **Resumable to the bit.** Rows for (step, micro-step, rank) are ``global_row = step * global_batch +
  (micro * world + rank) * micro_batch + i`` over the epoch plans of :meth:`PackedSplit.plan` (seed, epoch).
  A checkpoint holds DeepSpeed's model/optimiser state, the step, and every rank's python/numpy/torch RNG
  state; a killed run resumed from it reproduces the uninterrupted loss curve exactly (fp32, same world size).
- **Checkpoints are verified.** ``out/checkpoints/step_XXXXXXXX/`` gets a manifest (file sizes, sha256) written
  after every rank finished saving; ``out/checkpoints/latest`` is replaced atomically only then. A kill while
  saving leaves the previous checkpoint as the latest; a damaged file is a :class:`CheckpointError` naming it.
- **NaN/inf loss stops the run** (:class:`DivergedError`) before anything is saved, so the last good checkpoint
  stays the latest. SIGTERM (Slurm pre-emption) checkpoints at the end of the current step and exits.

Output (``out``): the Hugging Face model (``AutoModelForCausalLM.from_pretrained(out)``), ``foresight.json``
(tokenizer, data fingerprint, training and DeepSpeed config, metrics, time-head flag), ``vocab.json``,
``train_log.jsonl`` (one JSON record per step and per evaluation), ``loss_curve.png`` and ``checkpoints/``.

Multi-GPU / multi-node: ``deepspeed --num_gpus 8 $(which foresight) train --data D --out M --deepspeed-config
deploy/deepspeed/multi_gpu.json`` (add ``--hostfile`` for several nodes; checkpoints must be on a shared disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# DeepSpeed compiles a small shared-memory op for CPU collectives on first use (~40 s); a stable cache directory
# means tests, CI and the demo pay for it once. Set before deepspeed is imported.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "foresight" / "torch_extensions"))

logger = logging.getLogger("foresight.train")

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "foresight_checkpoint.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Every training option, listed once with its default; stored in checkpoints and ``foresight.json``."""

    preset: str = "small"  # model size: tiny | small | base | large (foresight.model.PRESETS)
    seq_len: int = 512  # tokens per packed row
    micro_batch: int = 8  # rows per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimiser step
    max_steps: int = 2000  # optimiser steps; the cosine schedule ends here
    lr: float = 1e-3  # peak learning rate (small models on short timelines tolerate a high one)
    min_lr: float = 1e-4  # the cosine decays to this
    warmup_steps: int = 100  # linear warm-up from ~0 to lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient-norm clipping (0 disables)
    eval_every: int = 200  # steps between tuning-split evaluations (0: only at the end)
    eval_rows: int = 256  # tuning rows per evaluation (0: all of them)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10  # steps between progress lines (every step is written to train_log.jsonl)
    seed: int = 1337  # model initialisation and data order
    time_head: bool = False  # add the exponential time-to-next-event loss (foresight.model docstring)
    time_loss_weight: float = 1.0
    stop_at_step: int = 0  # > 0: checkpoint at this step and stop without saving the model (time-boxed jobs)

    # Changing these between a checkpoint and its resumption would silently train a different run.
    MUST_MATCH_ON_RESUME = ("preset", "seq_len", "micro_batch", "grad_accum", "seed", "time_head")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a JSON file); unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


class TrainingError(Exception):
    """Training cannot start or continue; the message says why."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, incomplete, damaged or from a different run; the message names the path."""


class DivergedError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


# --- deepspeed configuration ------------------------------------------------------------------------------

DEFAULT_DEEPSPEED = {
    "cpu": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}},
    "gpu": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
}


def deepspeed_config(cfg: TrainConfig, path: Path | None, *, on_gpu: bool, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run: the JSON file (or the default for the device) with batch, accumulation,
    clipping and optimiser hyper-parameters filled in from ``cfg`` where the file says ``"auto"`` or nothing.

    An explicit number in the file that disagrees with ``cfg`` is an error (two sources of truth would make
    the data order, and so resumption, depend on which one won).
    """
    import copy

    if path is not None:
        try:
            ds = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{path}: cannot read the DeepSpeed config: {exc}") from exc
    else:
        ds = copy.deepcopy(DEFAULT_DEEPSPEED["gpu" if on_gpu else "cpu"])
    where = str(path) if path else "the default DeepSpeed config"
    ours = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise TrainingError(f"{where}: {key} = {ds[key]} disagrees with the training config ({value}); "
                                f"set it to \"auto\" and use the training options")
        ds[key] = value
    if not on_gpu and ds.get("fp16", {}).get("enabled"):
        raise TrainingError(f"{where}: fp16 is not supported on CPU; use bf16 or fp32")
    if "scheduler" in ds:
        raise TrainingError(f"{where}: remove the 'scheduler' section; the LR schedule is foresight's (warm-up + "
                            "cosine, TrainConfig.lr/min_lr/warmup_steps)")
    if "optimizer" in ds:  # DeepSpeed's own optimiser (e.g. for CPU offload): fill its "auto" hyper-parameters
        params = ds["optimizer"].setdefault("params", {})
        for key, value in {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "weight_decay": cfg.weight_decay}.items():
            if params.get(key, "auto") == "auto":
                params[key] = value
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# --- setup ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(on_gpu: bool) -> tuple[int, int, int]:
    """Join (or create) the process group; returns (rank, local_rank, world_size).

    Not launched by a launcher (or launched with a world of one): act as rank 0 of 1 on a free local port, so
    DeepSpeed does not go looking for MPI. CPU ranks talk over gloo, GPUs over NCCL.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or os.environ.get("WORLD_SIZE", "1") == "1":
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # the fresh port has no agent store behind it
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size()


# --- data -----------------------------------------------------------------------------------------------


class RowStream:
    """Global row index -> a packed row, over consecutive epochs of :meth:`PackedSplit.plan` (seed, epoch).

    Epochs hold slightly different numbers of rows (packing depends on the shuffled order), so the index walks
    the epochs' row counts; only the plans near the current position are kept in memory.
    """

    def __init__(self, split: Any, seq_len: int, seed: int, epoch_rows: list[int] | None = None) -> None:
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.epoch_rows: list[int] = list(epoch_rows or [])  # known row counts per epoch (from a checkpoint)
        self._plans: dict[int, Any] = {}

    def _plan(self, epoch: int) -> Any:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self.split.plan(self.seq_len, seed=self.seed, epoch=epoch)
            if self._plans[epoch].n_rows == 0:
                raise TrainingError(f"the {self.split.split} split has no rows to train on")
        return self._plans[epoch]

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, row) of global row ``g``."""
        epoch, start = 0, 0
        while True:
            if epoch == len(self.epoch_rows):
                self.epoch_rows.append(self._plan(epoch).n_rows)
            if g < start + self.epoch_rows[epoch]:
                return epoch, g - start
            start += self.epoch_rows[epoch]
            epoch += 1

    def row(self, g: int) -> dict[str, np.ndarray]:
        epoch, r = self.locate(g)
        return self.split.row(self._plan(epoch), r)


def collate(rows: list[dict[str, np.ndarray]], device: Any) -> dict[str, Any]:
    """Stack rows into (B, T) tensors on ``device``."""
    import torch

    return {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(device, non_blocking=True) for k in rows[0]}


def unigram_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution of ``labels`` (ignored labels left out): the loss of
    the best context-free predictor fitted on these very tokens, a bar any sequence model must clear."""
    lab = labels[labels != -100]
    if len(lab) == 0:
        return float("nan")
    p = np.bincount(lab).astype(np.float64)
    p = p[p > 0] / len(lab)
    return float(-(p * np.log(p)).sum())


# --- evaluation -----------------------------------------------------------------------------------------


def forward_losses(model: Any, batch: dict[str, Any], event_bias: Any | None) -> dict[str, Any]:
    """One forward pass over a packed batch: summed next-token CE and (with the time head) summed time NLL.

    ``attention_mask`` stays None and ``use_cache=False`` so transformers derives the block-diagonal causal mask
    from ``position_ids`` (document masking): no token attends to another subject's tokens.
    """
    from foresight.model import next_token_loss, time_to_event_loss

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    ce_sum, ce_n = next_token_loss(logits, batch["labels"])
    out = {"ce_sum": ce_sum, "ce_n": ce_n}
    if event_bias is not None:
        out["t_sum"], out["t_n"] = time_to_event_loss(logits, event_bias, batch["time_to_next_days"])
    return out


def estimate_loss(model: Any, split: Any, seq_len: int, seed: int, n_rows: int, micro_batch: int, device: Any,
                  event_bias: Any | None = None, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Token-weighted loss over the first ``n_rows`` rows (0: all) of ``split``'s epoch-0 plan, sharded over ranks.

    Works on a DeepSpeed engine or a plain model (e.g. one reloaded with ``from_pretrained``). Every rank runs
    the same number of forward passes (ZeRO-3 gathers weights collectively); shorter shards repeat a row with
    weight 0.
    """
    import torch
    import torch.distributed as dist

    plan = split.plan(seq_len, seed=seed, epoch=0)
    n = plan.n_rows if n_rows <= 0 else min(n_rows, plan.n_rows)
    mine = np.array_split(np.arange(n), world_size)[rank]
    n_batches = math.ceil(math.ceil(n / world_size) / micro_batch) if n else 0
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # ce_sum, ce_n, t_sum, t_n
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * micro_batch:(b + 1) * micro_batch]
            weight = 1.0 if len(idx) else 0.0
            rows = [split.row(plan, int(r)) for r in (idx if len(idx) else [0])]
            res = forward_losses(model, collate(rows, device), event_bias)
            totals += weight * torch.stack([res["ce_sum"].double(), res["ce_n"].double(),
                                            res.get("t_sum", torch.zeros(())).double().to(device),
                                            res.get("t_n", torch.zeros(())).double().to(device)])
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    ce_sum, ce_n, t_sum, t_n = totals.tolist()
    out = {"loss": ce_sum / max(ce_n, 1.0), "tokens": ce_n, "rows": n}
    if event_bias is not None:
        out["time_loss"] = t_sum / max(t_n, 1.0)
        out["time_positions"] = t_n
    return out


def eval_baselines(split: Any, seq_len: int, seed: int, n_rows: int) -> dict[str, float]:
    """Context-free bars on the evaluation rows: unigram entropy (nats) and the constant-rate exponential NLL."""
    plan = split.plan(seq_len, seed=seed, epoch=0)
    n = plan.n_rows if n_rows <= 0 else min(n_rows, plan.n_rows)
    rows = [split.row(plan, r) for r in range(n)]
    if not rows:
        return {"unigram_entropy": float("nan"), "constant_rate_time_nll": float("nan")}
    dt = np.concatenate([r["time_to_next_days"] for r in rows]).astype(np.float64)
    dt = dt[dt > 0]
    # the MLE of one exponential rate is 1 / mean(dt); its NLL per gap is 1 + log(mean dt)
    const = float(1.0 + np.log(dt.mean())) if len(dt) else float("nan")
    return {"unigram_entropy": unigram_entropy(np.concatenate([r["labels"] for r in rows])),
            "constant_rate_time_nll": const}


# --- learning rate --------------------------------------------------------------------------------------


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / (cfg.warmup_steps + 1)
    if it >= cfg.max_steps:
        return cfg.min_lr
    ratio = (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# --- checkpoints ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(path.iterdir())
                 if p.is_file() and p.name != MANIFEST}
        manifest = {"step": step, "world_size": world_size, "files": files,
                    "saved": datetime.now(UTC).isoformat(timespec="seconds")}
        _atomic_write(path / MANIFEST, json.dumps(manifest, indent=1))
        _atomic_write(ckpt_dir / "latest", tag)  # the same pointer file DeepSpeed's own tools read
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name != tag)
        for p in old[:max(0, len(old) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when there is none."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not tag:
        raise CheckpointError(f"{pointer}: empty pointer file")
    return ckpt_dir / tag


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
        if _sha256(f) != meta["sha256"]:
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


class _InlineExecutor:
    """The ``submit``/``shutdown`` of an executor, running each call at once in the caller's thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, **_kwargs: Any) -> None:
        pass


def _read_log(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Records of ``train_log.jsonl`` up to a step (a line cut short by a kill is dropped)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= upto_step:
                out.append(rec)
    return out


# --- the loop -------------------------------------------------------------------------------------------


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    deepspeed_config_path: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a model on ``data_dir`` (written by ``foresight tokenize``) into ``out_dir``; returns a summary.

    ``resume``: continue from ``out_dir/checkpoints/latest`` (a fresh start when there is none). Without it an
    ``out_dir`` that already holds checkpoints is refused, so a run is never overwritten by accident.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    from foresight import model as M
    from foresight.dataset import PackedSplit

    cfg = cfg or TrainConfig()
    data_dir, out = Path(data_dir), Path(out_dir)
    ds_path = Path(deepspeed_config_path) if deepspeed_config_path else None
    t_start = time.perf_counter()
    if not (data_dir / "vocab.json").exists():  # fail before starting any process group
        raise TrainingError(f"{data_dir}: no vocab.json (run `foresight tokenize` first)")

    # ---- setup: processes, device, determinism
    on_gpu = torch.cuda.is_available()
    rank, local_rank, world = init_distributed(on_gpu)
    master = rank == 0
    say = (log or logger.info) if master else (lambda _msg: None)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_cfg = deepspeed_config(cfg, ds_path, on_gpu=on_gpu, world_size=world)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    # ---- data
    train_split = PackedSplit(data_dir, "train")
    tuning_split = PackedSplit(data_dir, "tuning", vocab=train_split.vocab)
    vocab = train_split.vocab
    stream = RowStream(train_split, cfg.seq_len, cfg.seed)
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    tokens_per_step = global_batch * cfg.seq_len
    pad_id = vocab.index["[PAD]"]

    def batch_for(step: int) -> list[dict[str, Any]]:
        """This rank's micro-batches for optimiser step ``step`` (a pure function of seed and step)."""
        micro = []
        for m in range(cfg.grad_accum):
            base = step * global_batch + (m * world + rank) * cfg.micro_batch
            micro.append(collate([stream.row(base + i) for i in range(cfg.micro_batch)], device))
        return micro

    # ---- model
    ckpt_dir = out / CHECKPOINT_DIR
    if master:
        out.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if latest is not None and not resume:
        raise TrainingError(f"{out} already holds checkpoints ({latest}); pass --resume to continue that run or "
                            "choose another --out")
    precision = "bf16" if ds_cfg.get("bf16", {}).get("enabled") else "fp32"
    # flash-attention-2 (varlen kernels driven by the same position_ids) only runs in 16-bit; fp32 uses SDPA
    attn = None if precision == "bf16" else "sdpa"
    model = M.build_model(cfg.preset, vocab, seed=cfg.seed, max_positions=max(4096, cfg.seq_len),
                          attn_implementation=attn)
    n_params = M.count_parameters(model)
    flops_token = M.flops_per_token(model, cfg.seq_len)  # before ZeRO-3 partitions the parameters away
    groups = M.param_groups(model, cfg.weight_decay)
    if "optimizer" in ds_cfg:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
    else:
        optimizer = M.configure_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          betas=(cfg.beta1, cfg.beta2))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    event_bias = torch.from_numpy(M.event_log_bias(vocab)).to(device) if cfg.time_head else None
    say(f"{cfg.preset} model: {n_params:,} parameters, {world} rank(s) on {device.type}, ZeRO stage "
        f"{engine.zero_optimization_stage()}, {precision}, attention {model.config._attn_implementation}; "
        f"{tokens_per_step:,} tokens per step")

    # ---- resume
    step, history = 0, []
    client_base = {"train_config": asdict(cfg), "data_fingerprint": vocab.fingerprint}
    if resume and latest is not None:
        state = load_checkpoint(engine, latest, rank=rank, world_size=world)
        saved_cfg = state.get("train_config", {})
        for key in TrainConfig.MUST_MATCH_ON_RESUME:
            if saved_cfg.get(key) != getattr(cfg, key):
                raise CheckpointError(f"{latest}: was trained with {key}={saved_cfg.get(key)!r}, this run asks "
                                      f"for {getattr(cfg, key)!r}")
        if state.get("data_fingerprint") != vocab.fingerprint:
            raise CheckpointError(f"{latest}: was trained on data with fingerprint {state.get('data_fingerprint')}, "
                                  f"{data_dir} has {vocab.fingerprint}")
        step = int(state["step"])
        stream.epoch_rows = list(state.get("epoch_rows", []))
        history = _read_log(out / LOG_FILE, step)
        say(f"resumed from {latest} at step {step}")
    elif resume:
        say(f"no checkpoint in {ckpt_dir}: starting from step 0")
    if master:  # the log now holds exactly the steps before `step` (a killed run's later lines are dropped)
        (out / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
    dist.barrier()
    baselines = eval_baselines(tuning_split, cfg.seq_len, cfg.seed, cfg.eval_rows)

    def evaluate(at_step: int) -> dict[str, float]:
        res = estimate_loss(engine, tuning_split, cfg.seq_len, cfg.seed, cfg.eval_rows, cfg.micro_batch, device,
                            event_bias, rank, world)
        rec = {"kind": "eval", "step": at_step, "tuning_loss": res["loss"], **(
            {"tuning_time_loss": res["time_loss"]} if cfg.time_head else {})}
        write_log(rec)
        say(f"step {at_step}: tuning loss {res['loss']:.4f} (unigram entropy {baselines['unigram_entropy']:.4f})"
            + (f", time NLL {res['time_loss']:.4f} (constant rate {baselines['constant_rate_time_nll']:.4f})"
               if cfg.time_head else ""))
        return res

    def write_log(rec: dict[str, Any]) -> None:
        history.append(rec)
        if master:
            with open(out / LOG_FILE, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def checkpoint(at_step: int) -> Path:
        client = {**client_base, "step": at_step, "epoch_rows": stream.epoch_rows}
        return save_checkpoint(engine, ckpt_dir, at_step, client, rank=rank, world_size=world,
                               keep=cfg.keep_checkpoints)

    # SIGTERM (Slurm pre-emption, `kill`): finish the step, checkpoint, exit cleanly.
    stop_requested = {"flag": False}
    old_handler = None
    with contextlib.suppress(ValueError):  # not the main thread (e.g. a Prefect worker thread): no handler
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.update(flag=True))

    # ---- the loop
    peak = M.peak_flops(torch.cuda.get_device_name(device)) if on_gpu else None
    train_seconds, steps_timed, steps_run, pad_positions, positions = 0.0, 0, 0, 0, 0
    last_ckpt_step = step if latest is not None and resume else -1
    status = "completed"
    # On GPU a thread builds the next step's rows while the kernels run; on CPU every core is already busy with
    # the maths, so the rows are built inline (a second busy thread there only slows both down).
    prefetch = ThreadPoolExecutor(max_workers=1) if on_gpu else _InlineExecutor()
    next_batch = prefetch.submit(batch_for, step)
    try:
        while step < cfg.max_steps:
            t0, c0 = time.perf_counter(), time.process_time()  # wall time includes any wait for its rows
            lr = get_lr(step, cfg)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            micro_batches = next_batch.result()
            if step + 1 < cfg.max_steps:
                next_batch = prefetch.submit(batch_for, step + 1)
            stats = torch.zeros(5, dtype=torch.float64, device=device)  # ce_sum, ce_n, t_sum, t_n, stop votes
            for batch in micro_batches:
                res = forward_losses(engine, batch, event_bias)
                # joint NLL of tokens and (time head) gaps, per token: see foresight.model's docstring
                loss_sum = res["ce_sum"] + (cfg.time_loss_weight * res["t_sum"] if event_bias is not None else 0.0)
                loss = loss_sum / res["ce_n"].clamp(min=1)
                engine.backward(loss)  # DeepSpeed divides by grad_accum and reduces gradients across ranks
                engine.step()  # steps the optimiser (with clipping) on the last micro-step only
                stats[:4] += torch.stack([res["ce_sum"].detach().double(), res["ce_n"].double(),
                                          res.get("t_sum", torch.zeros(())).detach().double().to(device),
                                          res.get("t_n", torch.zeros(())).double().to(device)])
                pad_positions += int((batch["input_ids"] == pad_id).sum())
                positions += batch["input_ids"].numel()
            stats[4] = float(stop_requested["flag"])
            local_loss = (stats[0] / stats[1].clamp(min=1)).reshape(1)
            rank_losses = [torch.zeros_like(local_loss) for _ in range(world)]
            dist.all_gather(rank_losses, local_loss)
            dist.all_reduce(stats)  # a NaN on any rank makes the sum NaN on every rank: all stop together
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            step += 1
            steps_run += 1
            ce_sum, ce_n, t_sum, t_n, stop_votes = stats.tolist()
            train_loss = ce_sum / max(ce_n, 1.0)
            time_loss = t_sum / max(t_n, 1.0) if cfg.time_head else None
            if not math.isfinite(train_loss) or (time_loss is not None and not math.isfinite(time_loss)):
                good = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
                raise DivergedError(f"loss became {train_loss} (time loss {time_loss}) at step {step}; nothing was "
                                    f"saved after it; the last good checkpoint is "
                                    f"{good or 'none (no checkpoint was written yet)'}; lower --lr or check the data")
            if steps_run > 1 or step == cfg.max_steps:  # the first step pays one-off warm-up costs
                train_seconds += dt
                steps_timed += 1
            tok_s = tokens_per_step / dt
            rec = {"kind": "train", "step": step, "loss": train_loss, "lr": lr, "tokens_per_s": round(tok_s, 1),
                   "rank_losses": [float(x) for x in torch.cat(rank_losses).tolist()], "seconds": round(dt, 4),
                   "cpu_seconds": round(cpu, 4)}  # this process's CPU time: robust to other jobs on shared cores
            if time_loss is not None:
                rec["time_loss"] = time_loss
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            if peak:
                rec["mfu"] = round(flops_token * tok_s / (peak * world), 4)
            write_log(rec)
            if step % max(cfg.log_every, 1) == 0 or step == 1:
                say(f"step {step}/{cfg.max_steps}: loss {train_loss:.4f}" +
                    (f", time NLL {time_loss:.4f}" if time_loss is not None else "") +
                    f", lr {lr:.2e}, {tok_s:,.0f} tokens/s" + (f", MFU {rec['mfu']:.1%}" if peak else ""))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                evaluate(step)
            stopping = stop_votes > 0 or step == cfg.stop_at_step
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stopping:
                checkpoint(step)
                last_ckpt_step = step
            if stopping:
                status = "preempted" if stop_votes > 0 else "stopped"
                say(f"stopped at step {step} ({status}); resume with --resume")
                break
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    summary: dict[str, Any] = {"out": str(out), "status": status, "step": step, "parameters": n_params,
                               "world_size": world}
    tokens_per_s = tokens_per_step * steps_timed / train_seconds if train_seconds else None
    if status != "completed":
        summary["checkpoint"] = str(latest_checkpoint(ckpt_dir))
        return summary

    # ---- the end: evaluate, checkpoint, save the model and its card
    last_eval = evaluate(step)
    if last_ckpt_step != step:
        checkpoint(step)
    # ZeRO-3 shards the weights: gather them (a collective, every rank takes part) for rank 0 to save
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None
    checksums = [None] * world
    digest = None
    if engine.zero_optimization_stage() < 3:  # every rank holds the full weights: they must be identical
        h = hashlib.sha256()
        for p in engine.module.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes())
        digest = h.hexdigest()
    dist.all_gather_object(checksums, digest)
    if digest is not None and len(set(checksums)) != 1:
        raise TrainingError(f"ranks ended with different weights ({checksums}); data-parallel sync is broken")
    train_records = [r for r in history if r.get("kind") == "train"]
    metrics = {
        "train_loss": train_records[-1]["loss"] if train_records else None,
        "tuning_loss": last_eval["loss"],
        "unigram_entropy_tuning": baselines["unigram_entropy"],
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "mfu": round(flops_token * tokens_per_s / (peak * world), 4) if peak and tokens_per_s else None,
        "padding_fraction": round(pad_positions / positions, 5) if positions else None,
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if cfg.time_head:
        metrics["tuning_time_loss"] = last_eval.get("time_loss")
        metrics["constant_rate_time_nll_tuning"] = baselines["constant_rate_time_nll"]
    if master:
        engine.module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        shutil.copyfile(data_dir / "vocab.json", out / "vocab.json")
        if (data_dir / "code_descriptions.json").exists():  # readable names for predictions and the model card
            shutil.copyfile(data_dir / "code_descriptions.json", out / "code_descriptions.json")
        card = {
            "format_version": 1,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "preset": M.describe(cfg.preset),
            "parameters": n_params,
            "tokenizer": {"vocab": "vocab.json", "vocab_size": len(vocab.tokens), "config": asdict(vocab.config),
                          "special_tokens": {t: vocab.index[t] for t in ("[PAD]", "[BOS]", "[END]")}},
            "data": {"dir": str(data_dir.resolve()), "fingerprint": vocab.fingerprint, "seq_len": cfg.seq_len,
                     "train_tokens": train_split.n_tokens, "tuning_tokens": tuning_split.n_tokens},
            "training": asdict(cfg),
            "deepspeed": ds_cfg,
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "precision": precision,
            "time_head": {"enabled": cfg.time_head, "weight": cfg.time_loss_weight, "unit": "days",
                          "event_tokens": int(M.event_token_mask(vocab).sum()),
                          "log_rate_offset": float(np.log(max(int(M.event_token_mask(vocab).sum()), 1))),
                          "loss": "joint per-token NLL: (sum CE + weight * sum exponential gap NLL) / tokens"},
            "metrics": metrics,
            "rank_weight_checksums": checksums,
        }
        (out / "foresight.json").write_text(json.dumps(card, indent=1, default=str))
        plot_loss_curve(history, out / "loss_curve.png", baselines["unigram_entropy"])
    dist.barrier()
    say(f"saved the model to {out}: tuning loss {metrics['tuning_loss']:.4f} vs unigram entropy "
        f"{metrics['unigram_entropy_tuning']:.4f}; {metrics['tokens_per_s'] or 0:,.0f} tokens/s")
    summary.update(metrics=metrics, checkpoint=str(latest_checkpoint(ckpt_dir)))
    return summary


def plot_loss_curve(history: list[dict[str, Any]], path: Path, unigram: float | None = None) -> None:
    """Train loss per step, tuning loss per evaluation and the unigram-entropy bar, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    ev = [(r["step"], r["tuning_loss"]) for r in history if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=1, label="train")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", lw=1.5, label="tuning")
    if unigram is not None and math.isfinite(unigram):
        ax.axhline(unigram, ls="--", color="grey", label="unigram entropy (tuning)")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # `deepspeed --module foresight.train ...` runs the CLI's train command
    from foresight.cli import app

    sys.exit(app(["train", *sys.argv[1:]]))
