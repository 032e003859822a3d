"""Training options (:class:`TrainConfig`, every default listed once) and the DeepSpeed JSON built from them.

- **Precision and sharding come from the DeepSpeed JSON** (``deploy/deepspeed/*.json``): ZeRO stage, bf16 or
  fp32, CPU offload. Batch size, accumulation and clipping come from :class:`TrainConfig` (the JSON says
  ``"auto"``). fp32 or bf16 work on CPU; fp16 does not. Without a file: fp32 stage 0 on CPU, bf16 stage 1 on GPU.
- **The optimiser is a plain ``torch.optim.AdamW``** handed to DeepSpeed (nothing to compile, CPU runs start in
  seconds). A JSON ``optimizer`` section switches to DeepSpeed's own (needed for ZeRO-3 CPU offload).
- **The LR schedule is ours** (:func:`foresight.train.loop.get_lr`), so the JSON must not carry a ``scheduler``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from foresight.train.errors import TrainingError


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
    # the position before [END] is a censored observation (foresight.censoring): its loss is -log P(no event
    # before the extract ends), not the cross-entropy of an [END] token; False: [END] as an ordinary token
    end_as_censoring: bool = True
    stop_at_step: int = 0  # > 0: checkpoint at this step and stop without saving the model (time-boxed jobs)
    init_from: str = ""  # a trained model directory to start from (fine-tuning; same preset and vocabulary); "": fresh
    # A piece that continues a cut timeline starts with up to this many distinct codes of ``history_kinds`` recorded
    # before the cut (foresight.tokens.history), so the model keeps what a short context would forget; 0: none
    history_block: int = 0
    history_kinds: tuple[str, ...] = ("DX", "PX")

    # Changing these between a checkpoint and its resumption would silently train a different run.
    MUST_MATCH_ON_RESUME = ("preset", "seq_len", "micro_batch", "grad_accum", "seed", "time_head",
                           "end_as_censoring", "history_block", "history_kinds")

    def __post_init__(self) -> None:
        if not 0 <= self.history_block <= self.seq_len // 2:
            raise ValueError(f"history_block {self.history_block}: must be 0 (none) up to half of seq_len "
                             f"({self.seq_len // 2}), or the block crowds out the timeline it summarises")
        if self.history_block and not self.history_kinds:
            raise ValueError("history_kinds is empty: name the code kinds of the history block (e.g. DX,PX)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a JSON file); unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "history_kinds" in d:  # a JSON list, or "DX,PX"
            kinds = d["history_kinds"]
            d = {**d, "history_kinds": tuple(k.strip().upper() for k in
                                             (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip())}
        return cls(**d)


DEFAULT_DEEPSPEED = {
    "cpu": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}},
    "gpu": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
}


def precision_of(ds_cfg: dict[str, Any]) -> str:
    """``"bf16"`` or ``"fp32"``: the weights' precision under a DeepSpeed config."""
    return "bf16" if ds_cfg.get("bf16", {}).get("enabled") else "fp32"


def deepspeed_config(cfg: TrainConfig, path: Path | None, *, on_gpu: bool, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run: the JSON file (or the default for the device) with batch, accumulation,
    clipping and optimiser hyper-parameters filled in from ``cfg`` where the file says ``"auto"`` or nothing.

    An explicit number in the file that disagrees with ``cfg`` is an error (two sources of truth would make
    the data order, and so resumption, depend on which one won).
    """
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
