"""Training: one readable loop over ``deepspeed.initialize``, the same code on a laptop CPU and on GPUs.

Read :mod:`foresight.train.loop` top to bottom: setup (distributed, device, data, model) -> resume ->
``estimate_loss()`` -> ``get_lr(it)`` -> the loop (set LR, micro-steps with ``engine.backward(loss);
engine.step()``, log, evaluate, checkpoint) -> save. Where the rest lives:

- :mod:`~foresight.train.config`: :class:`TrainConfig` (every option once, with its default) and the DeepSpeed
  JSON built from it (precision and sharding from the file, batch/accumulation/clipping from the config).
- :mod:`~foresight.train.engine`: process group, device, data (:class:`foresight.dataset.RowStream`) and the
  Llama preset wrapped by DeepSpeed (a plain ``torch.optim.AdamW`` unless the JSON names an optimiser).
- :mod:`~foresight.train.losses`: the packed batch's losses, the tuning evaluation, the context-free bars.
- :mod:`~foresight.train.checkpoint`: verified checkpoints (manifest of sizes and sha256, atomic ``latest``),
  resumable to the bit (model/optimiser state, step, every rank's RNG state).
- :mod:`~foresight.train.log` and :mod:`~foresight.train.card`: ``train_log.jsonl`` and the loss curve; the model
  directory with ``foresight.json``.

Output (``out``): the Hugging Face model (``AutoModelForCausalLM.from_pretrained(out)``), ``foresight.json``
(tokenizer, data fingerprint, training and DeepSpeed config, metrics, time-head flag), ``vocab.json``,
``train_log.jsonl`` (one JSON record per step and per evaluation), ``loss_curve.png`` and ``checkpoints/``.

Multi-GPU / multi-node: ``deepspeed --num_gpus 8 $(which foresight) train --data D --out M --deepspeed-config
deploy/deepspeed/multi_gpu.json`` (add ``--hostfile`` for several nodes; checkpoints must be on a shared disk).
"""

from __future__ import annotations

from foresight.train.card import CARD, model_card
from foresight.train.checkpoint import (
    CHECKPOINT_DIR,
    MANIFEST,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from foresight.train.config import DEFAULT_DEEPSPEED, TrainConfig, deepspeed_config
from foresight.train.engine import init_distributed, logger
from foresight.train.errors import CheckpointError, DivergedError, TrainingError
from foresight.train.log import LOG_FILE, plot_loss_curve
from foresight.train.loop import get_lr, train
from foresight.train.losses import estimate_loss, eval_baselines, forward_losses, unigram_entropy

__all__ = [
    "CARD",
    "CHECKPOINT_DIR",
    "DEFAULT_DEEPSPEED",
    "LOG_FILE",
    "MANIFEST",
    "CheckpointError",
    "DivergedError",
    "TrainConfig",
    "TrainingError",
    "deepspeed_config",
    "estimate_loss",
    "eval_baselines",
    "forward_losses",
    "get_lr",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "logger",
    "model_card",
    "plot_loss_curve",
    "save_checkpoint",
    "train",
    "unigram_entropy",
    "verify_checkpoint",
]
