"""Losses of a packed batch, the tuning-split evaluation, and the context-free bars a model must clear."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from foresight.censoring import GapBins, censored_loss
from foresight.dataset import IGNORE_INDEX, PackedSplit, collate
from foresight.model import next_token_loss, time_to_event_loss


def forward_losses(model: Any, batch: dict[str, Any], event_bias: Any | None, gaps: GapBins | None = None
                   ) -> dict[str, Any]:
    """One forward pass over a packed batch: summed next-token CE and (with the time head) summed time NLL.

    With ``gaps`` every position whose label is ``[END]`` is censored at the extract's end
    (:func:`foresight.censoring.censored_loss`, ``batch["censor_s"]``) instead of predicting an ``[END]`` token.

    ``attention_mask`` stays None and ``use_cache=False`` so transformers derives the block-diagonal causal mask
    from ``position_ids`` (document masking): no token attends to another subject's tokens.
    """
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    if gaps is not None:
        ce_sum, ce_n = censored_loss(logits, batch["labels"], batch["censor_s"], gaps)
    else:
        ce_sum, ce_n = next_token_loss(logits, batch["labels"])
    out = {"ce_sum": ce_sum, "ce_n": ce_n}
    if event_bias is not None:
        out["t_sum"], out["t_n"] = time_to_event_loss(logits, event_bias, batch["time_to_next_days"])
    return out


def loss_totals(res: dict[str, Any], device: Any) -> Any:
    """(4,) float64 tensor ``ce_sum, ce_n, t_sum, t_n`` of :func:`forward_losses`'s result (zeros without the time
    head), detached: the sums to add up over micro-steps and ranks."""
    import torch

    return torch.stack([res["ce_sum"].detach().double(), res["ce_n"].double(),
                        res.get("t_sum", torch.zeros(())).detach().double().to(device),
                        res.get("t_n", torch.zeros(())).double().to(device)])


def estimate_loss(model: Any, split: PackedSplit, seq_len: int, seed: int, n_rows: int, micro_batch: int,
                  device: Any, event_bias: Any | None = None, rank: int = 0, world_size: int = 1,
                  gaps: GapBins | None = None) -> dict[str, float]:
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
            totals += weight * loss_totals(forward_losses(model, collate(rows, device), event_bias, gaps), device)
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    ce_sum, ce_n, t_sum, t_n = totals.tolist()
    out = {"loss": ce_sum / max(ce_n, 1.0), "tokens": ce_n, "rows": n}
    if event_bias is not None:
        out["time_loss"] = t_sum / max(t_n, 1.0)
        out["time_positions"] = t_n
    return out


def unigram_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution of ``labels`` (ignored labels left out): the loss of
    the best context-free predictor fitted on these very tokens, a bar any sequence model must clear."""
    lab = labels[labels != IGNORE_INDEX]
    if len(lab) == 0:
        return float("nan")
    p = np.bincount(lab).astype(np.float64)
    p = p[p > 0] / len(lab)
    return float(-(p * np.log(p)).sum())


def eval_baselines(split: PackedSplit, seq_len: int, seed: int, n_rows: int) -> dict[str, float]:
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
