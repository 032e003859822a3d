"""A run's setup: processes and device, the data, and the model wrapped by ``deepspeed.initialize``."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from foresight import model as M
from foresight.dataset import PackedSplit, RowStream
from foresight.tokens import PAD, Vocabulary
from foresight.tokens.history import HistoryBlock
from foresight.train.checkpoint import CHECKPOINT_DIR, find_checkpoint
from foresight.train.config import TrainConfig, deepspeed_config, precision_of
from foresight.train.errors import TrainingError

# DeepSpeed compiles a small shared-memory op for CPU collectives on first use (~40 s); a stable cache directory
# means tests, CI and the demo pay for it once. Set before deepspeed is imported.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "foresight" / "torch_extensions"))

logger = logging.getLogger("foresight.train")


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


@dataclass
class Run:
    """What one process of a training run set up before its first step."""

    cfg: TrainConfig
    data_dir: Path
    out: Path
    rank: int
    world: int  # ranks in the process group
    device: Any  # torch.device
    ds_cfg: dict[str, Any]  # the DeepSpeed config in force (deepspeed_config)
    train_split: PackedSplit
    tuning_split: PackedSplit
    stream: RowStream  # the train rows, a pure function of (seed, global row)
    latest: Path | None  # the checkpoint this run resumes from (None: step 0)
    engine: Any  # deepspeed.DeepSpeedEngine around the Llama model
    n_params: int
    flops_token: float  # training FLOPs per token (for MFU)
    event_bias: Any | None  # (V,) tensor of foresight.model.event_log_bias; None without the time head
    say: Callable[[str], None]  # progress lines: the caller's log on rank 0, silent elsewhere

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def vocab(self) -> Vocabulary:
        return self.train_split.vocab

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    @property
    def precision(self) -> str:
        return precision_of(self.ds_cfg)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.micro_batch * self.cfg.grad_accum * self.world * self.cfg.seq_len

    @property
    def pad_id(self) -> int:
        return self.vocab.index[PAD]

    @cached_property
    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name(self.device) if self.on_gpu else "cpu"

    @cached_property
    def peak_flops(self) -> float | None:
        """Peak bf16 FLOP/s of one rank's GPU (None on CPU or an unknown GPU: no MFU then)."""
        return M.peak_flops(self.device_name) if self.on_gpu else None


def initial_weights(cfg: TrainConfig, vocab: Vocabulary, data_dir: Path) -> dict[str, Any] | None:
    """The weights of ``cfg.init_from`` to start from (fine-tuning), or None for a fresh initialisation.

    Token ids are positions in the embedding and output matrices, so the data must be numbered in the source
    model's own vocabulary (the same tokens in the same order): a token folder tokenized with another vocabulary is
    refused, and so is a preset other than the source model's (the shapes would not match).
    """
    if not cfg.init_from:
        return None
    import torch
    from transformers import AutoModelForCausalLM

    src = Path(cfg.init_from)
    for name in ("vocab.json", "config.json", "foresight.json"):
        if not (src / name).exists():
            raise TrainingError(f"--init-from {src}: no {name}: not a trained Foresight model directory")
    if (src / ".incomplete").exists():
        raise TrainingError(f"--init-from {src}: its save was interrupted; finish training it first")
    source_vocab = Vocabulary.load(src / "vocab.json")
    if list(source_vocab.tokens) != list(vocab.tokens):
        raise TrainingError(
            f"{data_dir}: its vocabulary ({len(vocab.tokens):,} tokens) differs from the vocabulary of the model in "
            f"{src} ({len(source_vocab.tokens):,} tokens): token ids would mean different codes; re-read the data "
            "with the model's vocabulary (foresight.evaluate.crosssource.encode_in_vocabulary, or remap_folder for "
            "a token folder) and fine-tune on that folder")
    source_preset = json.loads((src / "foresight.json").read_text()).get("training", {}).get("preset")
    if source_preset != cfg.preset:
        raise TrainingError(f"--init-from {src}: a {source_preset} model, but this run asks for preset {cfg.preset}; "
                            f"use --preset {source_preset}")
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in source.state_dict().items()}


def build_engine(cfg: TrainConfig, vocab: Vocabulary, ds_cfg: dict[str, Any],
                 init: dict[str, Any] | None = None) -> tuple[Any, int, float]:
    """The Llama preset (its weights ``init`` when given, else initialised from ``cfg.seed``) wrapped by
    ``deepspeed.initialize``; returns (engine, parameters, FLOPs per token)."""
    import deepspeed

    # flash-attention-2 (varlen kernels driven by the same position_ids) only runs in 16-bit; fp32 uses SDPA
    attn = None if precision_of(ds_cfg) == "bf16" else "sdpa"
    model = M.build_model(cfg.preset, vocab, seed=cfg.seed, max_positions=max(4096, cfg.seq_len),
                          attn_implementation=attn)
    if init is not None:  # fine-tuning: every weight from the source model (strict: same shapes, same names)
        model.load_state_dict(init, strict=True)
    n_params = M.count_parameters(model)
    flops_token = M.flops_per_token(model, cfg.seq_len)  # before ZeRO-3 partitions the parameters away
    groups = M.param_groups(model, cfg.weight_decay)
    if "optimizer" in ds_cfg:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
    else:
        optimizer = M.configure_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          betas=(cfg.beta1, cfg.beta2))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    return engine, n_params, flops_token


def setup(data_dir: Path, out: Path, cfg: TrainConfig, ds_path: Path | None, *, resume: bool,
          log: Callable[[str], None] | None) -> Run:
    """Every rank: join the process group, pick the device, seed, open the data, find the checkpoint to resume
    from (refusing to overwrite a run without ``resume``), then build the model and its DeepSpeed engine."""
    import torch

    on_gpu = torch.cuda.is_available()
    rank, local_rank, world = init_distributed(on_gpu)
    say = (log or logger.info) if rank == 0 else (lambda _msg: None)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_cfg = deepspeed_config(cfg, ds_path, on_gpu=on_gpu, world_size=world)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    history = HistoryBlock.from_training(asdict(cfg))
    train_split = PackedSplit(data_dir, "train", history=history)
    tuning_split = PackedSplit(data_dir, "tuning", vocab=train_split.vocab, history=history)
    if len(train_split) == 0:  # no subject, no row (every subject fills at least one)
        raise TrainingError("the train split has no rows to train on")
    latest = find_checkpoint(out, resume=resume)
    # fine-tuning starts from another model's weights (refused before anything is written when the data does not
    # fit it); a resumed run starts from its own checkpoint instead
    init = initial_weights(cfg, train_split.vocab, data_dir) if latest is None else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    engine, n_params, flops_token = build_engine(cfg, train_split.vocab, ds_cfg, init)
    event_bias = torch.from_numpy(M.event_log_bias(train_split.vocab)).to(device) if cfg.time_head else None
    run = Run(cfg, data_dir, out, rank, world, device, ds_cfg, train_split, tuning_split,
              RowStream(train_split, cfg.seq_len, cfg.seed), latest, engine, n_params, flops_token, event_bias, say)
    if init is not None:
        say(f"fine-tuning: step-0 weights from {cfg.init_from}")
    say(f"{cfg.preset} model: {n_params:,} parameters, {world} rank(s) on {device.type}, ZeRO stage "
        f"{engine.zero_optimization_stage()}, {run.precision}, attention "
        f"{engine.module.config._attn_implementation}; {run.tokens_per_step:,} tokens per step")
    return run
