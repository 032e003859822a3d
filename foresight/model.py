"""The model: a decoder-only Llama transformer over patient-timeline tokens, sized by named presets.

Why Llama (``transformers.LlamaForCausalLM``) rather than GPT-2: rotary position embeddings (RoPE) have no
learned position table, so positions that restart at 0 in every packed piece cost nothing (each piece is
encoded exactly as if it were alone); RMSNorm and SwiGLU are the current default recipe; and both
SDPA and flash-attention-2 implement document masking from ``position_ids`` alone (block-diagonal causal mask on
CPU/SDPA, varlen kernels on GPU), which is exactly how :mod:`foresight.dataset` packs subjects.

The saved model is a plain ``LlamaForCausalLM``: ``AutoModelForCausalLM.from_pretrained(dir)`` loads it.

Time-to-next-event (Delphi-2M's idea, optional, no extra parameters)
--------------------------------------------------------------------
At a position ``t`` the logits ``l_v`` score every token ``v``. Read the logits of EVENT tokens as log-rates:
``lambda_v = exp(l_v - c)`` per day, and the rate of "some event happens" is ``Lambda = sum_{v in events}
lambda_v``. The constant ``c = log(number of event tokens)`` is fixed (not learned; stored in ``foresight.json``
as ``log_rate_offset``): it only makes an untrained model (logits near 0) start at about one event per day
instead of one per event type per day, which keeps the first steps of the time loss from swamping the rest.
Under competing exponential clocks the waiting time to the next event is ``Exponential(Lambda)`` and the next
event is ``v`` with probability ``lambda_v / Lambda`` — the same ranking as the softmax, so the usual
next-token cross-entropy is untouched. What the time loss adds is the absolute level of the logits, which the
softmax leaves free (it is shift-invariant), so one forward pass gives both *what* comes next and *when*.

EVENT tokens are the code tokens: everything except ``TIME//*``, ``Q<n>``, ``AGE//*``, ``YEAR//*``, ``MONTH//*``,
``BIRTH//*``, ``[PAD]``, ``[BOS]``, ``AGE//UNK``, the static prefix kinds (sex, race...) and ``[END]``.
``[END]`` is excluded because it is not an event that happens at a time: it marks where the record stops with
the subject alive (its token clock is the last event's time), i.e. censoring. ``MEDS_DEATH`` and the RARE
tokens are events.

The loss is applied only at positions that END a timestamp group — where the label is the first token of a
later clock time — with the observed gap ``dt`` in days (``time_to_next_days`` from the dataset). The
training loss is the joint negative log-likelihood of the tokens and of those gaps, per token::

    loss = ( sum_t CE_t + time_loss_weight * sum_{t ends a group} (-log Lambda_t + Lambda_t * dt_t) ) / n_tokens

(the bracket is the exponential negative log-density of the gap, in nats, with dt in days). Dividing by the token
count rather than the number of gaps keeps one long gap (years after a discharge) from dominating a step.
Reported as ``time_loss``: the mean exponential NLL per gap. The constant-rate baseline (one ``Lambda`` for
everybody, the MLE ``1 / mean(dt)``) scores ``1 + log(mean dt)``; a useful model beats it.
Forecasting reads ``E[wait] = 1 / Lambda`` and ``P(v first within h days) = lambda_v / Lambda * (1 -
exp(-Lambda h))`` (:func:`time_to_event`, with :func:`event_log_bias` holding ``-c`` on event tokens and
``-inf`` elsewhere); ``foresight.json`` records whether the head was trained, because without it ``Lambda``
is meaningless.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from foresight.tokens import (
    BOS,
    END,
    PAD,
    Vocabulary,
)


@dataclass(frozen=True)
class Preset:
    """The shape of a model; head size = d_model / n_head. d_ff follows SwiGLU's ~8/3 x d_model."""

    n_layer: int
    n_head: int
    n_kv_head: int  # < n_head: grouped-query attention (smaller KV cache for rollouts)
    d_model: int
    d_ff: int
    tie_embeddings: bool = False


# Approximate sizes are for a ~10k-token vocabulary (a full MIMIC-IV cohort); the demo's vocabulary is smaller.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layer=2, n_head=4, n_kv_head=4, d_model=64, d_ff=176),  # tests: < 1M parameters
    # a CPU-sized step between tiny and small (~6x tiny's compute per token): what 2 cores can train for an hour
    "mini": Preset(n_layer=4, n_head=4, n_kv_head=4, d_model=128, d_ff=344),  # ~0.6M
    "small": Preset(n_layer=6, n_head=8, n_kv_head=8, d_model=256, d_ff=688),  # demo: ~10M
    "base": Preset(n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048),  # ~100M
    "large": Preset(n_layer=20, n_head=16, n_kv_head=8, d_model=1024, d_ff=2816),  # ~250M (Foresight-England)
}


def flash_attention_available() -> bool:
    """True when a CUDA device and the flash-attn 2 package are both present (never required)."""
    if not torch.cuda.is_available():
        return False
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def build_config(preset: str | Preset, vocab: Vocabulary, *, max_positions: int = 4096,
                 attn_implementation: str | None = None) -> Any:
    """A ``LlamaConfig`` for a preset and vocabulary (pad/bos/eos ids from the vocabulary's special tokens).

    ``attn_implementation`` defaults to flash-attention-2 when available (GPU), else SDPA.
    """
    from transformers import LlamaConfig

    if isinstance(preset, str) and preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    eos = [vocab.index[END]] + ([vocab.index["MEDS_DEATH"]] if "MEDS_DEATH" in vocab.index else [])
    cfg = LlamaConfig(
        vocab_size=len(vocab.tokens),
        hidden_size=p.d_model,
        intermediate_size=p.d_ff,
        num_hidden_layers=p.n_layer,
        num_attention_heads=p.n_head,
        num_key_value_heads=p.n_kv_head,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=p.tie_embeddings,
        pad_token_id=vocab.index[PAD],
        bos_token_id=vocab.index[BOS],
        eos_token_id=eos if len(eos) > 1 else eos[0],
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = attn_implementation or ("flash_attention_2" if flash_attention_available() else "sdpa")
    return cfg


def build_model(preset: str | Preset, vocab: Vocabulary, *, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (initialisation is a pure function of ``seed``)."""
    from transformers import LlamaForCausalLM

    config = build_config(preset, vocab, **kwargs)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module, *, non_embedding: bool = False) -> int:
    """Parameters of ``model``; ``non_embedding`` leaves out the input embedding (a lookup, no FLOPs)."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        emb = model.get_input_embeddings().weight
        if not model.config.tie_word_embeddings:
            n -= emb.numel()
    return n


def preset_parameters(preset: str, vocab_size: int) -> int:
    """Parameter count of a preset for a vocabulary size, by formula (no model is built)."""
    p = PRESETS[preset]
    hd = p.d_model // p.n_head
    attn = p.d_model * hd * (2 * p.n_head + 2 * p.n_kv_head)  # q, o: n_head heads; k, v: n_kv_head heads
    mlp = 3 * p.d_model * p.d_ff  # SwiGLU: gate, up, down
    layer = attn + mlp + 2 * p.d_model  # + two RMSNorm weights
    emb = vocab_size * p.d_model * (1 if p.tie_embeddings else 2)
    return p.n_layer * layer + emb + p.d_model


def configure_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                        betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (projections, embeddings) but not on 1-D norm gains (nanoGPT).

    A plain torch optimizer needs no compiled DeepSpeed op, so CPU runs start in seconds; DeepSpeed wraps it
    for ZeRO stages 1-3. (CPU offload instead uses DeepSpeed's own optimizer from the JSON config.)
    """
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False, foreach=torch.cuda.is_available())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: 2-D weights (decayed) and everything else (norm gains: never decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward matmuls) + 12 L d T (attention scores), PaLM appendix B.

    Attention over packed rows touches fewer pairs than a full causal mask; we count the full mask (the
    convention for MFU), so MFU is comparable across runs and papers.
    """
    cfg = model.config
    n = count_parameters(model, non_embedding=True)
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# bf16 dense peak FLOP/s per device (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "V100": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device_name: str) -> float | None:
    """The peak bf16 FLOP/s of a named GPU (override with FORESIGHT_PEAK_TFLOPS), None if unknown."""
    if os.environ.get("FORESIGHT_PEAK_TFLOPS"):
        return float(os.environ["FORESIGHT_PEAK_TFLOPS"]) * 1e12
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


# --- the time-to-next-event head ----------------------------------------------------------------------------


def event_log_bias(vocab: Vocabulary) -> np.ndarray:
    """(V,) float32: ``-c`` on event tokens (``c = log #events``, see the module docstring), ``-inf`` elsewhere.

    ``logits + bias`` are the log-rates per day of the event tokens.
    """
    mask = vocab.is_event
    return np.where(mask, -np.log(max(int(mask.sum()), 1)), -np.inf).astype(np.float32)


def log_event_rate(logits: torch.Tensor, event_bias: torch.Tensor) -> torch.Tensor:
    """log Lambda = logsumexp(logits + event_bias): (..., V) -> (...), computed in float32."""
    return torch.logsumexp(logits.float() + event_bias, dim=-1)


def time_to_event_loss(logits: torch.Tensor, event_bias: torch.Tensor,
                       dt_days: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the exponential NLL ``-log Lambda + Lambda dt`` over positions with ``dt_days > 0``, and their count.

    logits (B, T, V), event_bias (V,) from :func:`event_log_bias`, dt_days (B, T). Returns (sum, count) so
    callers can normalise over ranks and micro-steps as they need.
    """
    target = dt_days > 0
    if not bool(target.any()):
        zero = logits.sum() * 0.0  # keeps the graph (every rank must run the same backward under ZeRO)
        return zero.float(), torch.zeros((), device=logits.device)
    log_rate = log_event_rate(logits[target], event_bias)  # (n,)
    dt = dt_days[target].float()
    nll = -log_rate + torch.exp(log_rate) * dt
    return nll.sum(), target.sum().float()


def time_to_event(logits: torch.Tensor, event_bias: torch.Tensor, horizon_days: float | None = None
                  ) -> dict[str, torch.Tensor]:
    """Rates from one forward pass at a timeline's last position: logits (..., V).

    Returns ``rate`` (Lambda per day), ``expected_days`` (1 / Lambda) and, with a horizon, ``risk`` (..., V):
    the probability that token v is the NEXT event and happens within the horizon (zero for non-events).
    Only meaningful for a model trained with the time head (``foresight.json: time_head.enabled``).
    """
    log_rate = log_event_rate(logits, event_bias)
    out = {"rate": torch.exp(log_rate), "expected_days": torch.exp(-log_rate)}
    if horizon_days is not None:
        share = torch.softmax(logits.float() + event_bias, dim=-1)  # lambda_v / Lambda
        out["risk"] = share * (-torch.expm1(-out["rate"] * horizon_days)).unsqueeze(-1)
    return out


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats) over labels != -100 and their count; labels are already shifted."""
    v = logits.shape[-1]
    loss = F.cross_entropy(logits.float().reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum().float()


def describe(preset: str) -> dict[str, Any]:
    """A preset as a plain dict (for foresight.json)."""
    return {"name": preset, **asdict(PRESETS[preset])}
