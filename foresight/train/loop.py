"""The training loop: ``train()`` reads top to bottom, and ``fit()`` is one visible loop over optimiser steps.

setup (:func:`foresight.train.engine.setup`: processes, device, data, model wrapped by DeepSpeed) -> resume
(:mod:`foresight.train.checkpoint`) -> ``fit``: set the LR (:func:`get_lr`), micro-steps with
``engine.backward(loss); engine.step()``, log, evaluate, checkpoint -> the model directory
(:mod:`foresight.train.card`).

- **The rows of a step are a pure function of (seed, step)** (:meth:`foresight.dataset.RowStream.step_rows`),
  so a run resumed from a checkpoint reproduces the uninterrupted loss curve exactly (fp32, same world size).
- **NaN/inf loss stops the run** (:class:`DivergedError`) before anything is saved, so the last good checkpoint
  stays the latest. SIGTERM (Slurm pre-emption) checkpoints at the end of the current step and exits.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from foresight.censoring import GapBins
from foresight.dataset import collate
from foresight.tokens import IncompleteTokensError, check_complete
from foresight.train.card import check_provenance, gather_weights, write_model_dir
from foresight.train.checkpoint import latest_checkpoint, resume_checkpoint, save_checkpoint
from foresight.train.config import TrainConfig
from foresight.train.engine import Run, setup
from foresight.train.errors import DivergedError, TrainingError
from foresight.train.log import LOG_FILE, TrainLog, read_log
from foresight.train.losses import estimate_loss, eval_baselines, forward_losses, loss_totals


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
    import torch.distributed as dist

    cfg = cfg or TrainConfig()
    data_dir, out = Path(data_dir), Path(out_dir)
    t_start = time.perf_counter()
    try:  # a missing, unfinished or changed token folder fails before any process group starts
        check_complete(data_dir, "train")
    except IncompleteTokensError as exc:
        raise TrainingError(str(exc)) from exc
    check_provenance(data_dir)  # the tokens' data-use purpose is still covered by every load (foresight.purposes)
    run = setup(data_dir, out, cfg, Path(deepspeed_config_path) if deepspeed_config_path else None,
                resume=resume, log=log)

    step = 0
    if run.latest is not None:
        state = resume_checkpoint(run.engine, run.latest, cfg, run.vocab.fingerprint, data_dir, rank=run.rank,
                                  world_size=run.world)
        step = int(state["step"])
        run.stream.epoch_rows = list(state.get("epoch_rows", []))
        run.say(f"resumed from {run.latest} at step {step}")
    elif resume:
        run.say(f"no checkpoint in {run.ckpt_dir}: starting from step 0")
    # the log now holds exactly the steps before `step` (a killed run's later lines are dropped)
    history = read_log(out / LOG_FILE, step) if run.latest is not None else []
    train_log = TrainLog(out / LOG_FILE, history, write=run.master)
    dist.barrier()
    baselines = eval_baselines(run.tuning_split, cfg.seq_len, cfg.seed, cfg.eval_rows)

    done = fit(run, step, train_log, baselines)
    summary: dict[str, Any] = {"out": str(out), "status": done.status, "step": done.step,
                               "parameters": run.n_params, "world_size": run.world}
    if done.status != "completed":
        summary["checkpoint"] = str(latest_checkpoint(run.ckpt_dir))
        return summary

    # the end: evaluate, checkpoint, save the model and its card
    last_eval = evaluate(run, train_log, baselines, done.step)
    if done.last_checkpoint != done.step:
        save(run, done.step)
    state_dict, checksums = gather_weights(run)
    metrics = done.metrics(run, train_log, last_eval, baselines, seconds=time.perf_counter() - t_start)
    if run.master:
        write_model_dir(run, state_dict, checksums, metrics, train_log.records, baselines["unigram_entropy"])
    dist.barrier()
    run.say(f"saved the model to {out}: tuning loss {metrics['tuning_loss']:.4f} vs unigram entropy "
            f"{metrics['unigram_entropy_tuning']:.4f}; {metrics['tokens_per_s'] or 0:,.0f} tokens/s")
    summary.update(metrics=metrics, checkpoint=str(latest_checkpoint(run.ckpt_dir)))
    return summary


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``.

    Written into the optimiser's param groups every step, so resuming needs only the step number.
    """
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / (cfg.warmup_steps + 1)
    if it >= cfg.max_steps:
        return cfg.min_lr
    ratio = (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def fit(run: Run, step: int, train_log: TrainLog, baselines: dict[str, float]) -> Progress:
    """Optimiser steps from ``step`` to ``cfg.max_steps``, or to a stop (``stop_at_step``, SIGTERM on any rank)."""
    import torch
    import torch.distributed as dist

    cfg, engine, device, world = run.cfg, run.engine, run.device, run.world
    done = Progress(step=step, last_checkpoint=step if run.latest is not None else -1)
    gaps = gap_bins(run)
    # On GPU a thread builds the next step's rows while the kernels run; on CPU every core is already busy with
    # the maths, so the rows are built inline (a second busy thread there only slows both down).
    prefetch = ThreadPoolExecutor(max_workers=1) if run.on_gpu else _InlineExecutor()
    next_batch = prefetch.submit(batch_for, run, step)
    try:
        with _sigterm_requests_stop() as stop_requested:
            while step < cfg.max_steps:
                t0, c0 = time.perf_counter(), time.process_time()  # wall time includes any wait for its rows
                lr = get_lr(step, cfg)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
                micro_batches = next_batch.result()
                if step + 1 < cfg.max_steps:
                    next_batch = prefetch.submit(batch_for, run, step + 1)
                stats = torch.zeros(5, dtype=torch.float64, device=device)  # ce_sum, ce_n, t_sum, t_n, stop votes
                for batch in micro_batches:
                    res = forward_losses(engine, batch, run.event_bias, gaps)
                    # joint NLL of tokens and (time head) gaps, per token: see foresight.model's docstring
                    loss_sum = res["ce_sum"] + (cfg.time_loss_weight * res["t_sum"] if run.event_bias is not None
                                                else 0.0)
                    loss = loss_sum / res["ce_n"].clamp(min=1)
                    engine.backward(loss)  # DeepSpeed divides by grad_accum and reduces gradients across ranks
                    engine.step()  # steps the optimiser (with clipping) on the last micro-step only
                    stats[:4] += loss_totals(res, device)
                    done.pad_positions += int((batch["input_ids"] == run.pad_id).sum())
                    done.positions += batch["input_ids"].numel()
                stats[4] = float(stop_requested())
                local_loss = (stats[0] / stats[1].clamp(min=1)).reshape(1)
                rank_losses = [torch.zeros_like(local_loss) for _ in range(world)]
                dist.all_gather(rank_losses, local_loss)
                dist.all_reduce(stats)  # a NaN on any rank makes the sum NaN on every rank: all stop together
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                step += 1
                done.step, done.steps_run = step, done.steps_run + 1
                ce_sum, ce_n, t_sum, t_n, stop_votes = stats.tolist()
                train_loss = ce_sum / max(ce_n, 1.0)
                time_loss = t_sum / max(t_n, 1.0) if cfg.time_head else None
                _stop_if_diverged(run, step, train_loss, time_loss)
                if done.steps_run > 1 or step == cfg.max_steps:  # the first step pays one-off warm-up costs
                    done.train_seconds += dt
                    done.steps_timed += 1
                rec = _step_record(run, step, train_loss, time_loss, lr, dt, cpu,
                                   [float(x) for x in torch.cat(rank_losses).tolist()])
                train_log.write(rec)
                if step % max(cfg.log_every, 1) == 0 or step == 1:
                    run.say(f"step {step}/{cfg.max_steps}: loss {train_loss:.4f}" +
                            (f", time NLL {time_loss:.4f}" if time_loss is not None else "") +
                            f", lr {lr:.2e}, {rec['tokens_per_s']:,.0f} tokens/s" +
                            (f", MFU {rec['mfu']:.1%}" if "mfu" in rec else ""))
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    evaluate(run, train_log, baselines, step)
                stopping = stop_votes > 0 or step == cfg.stop_at_step
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stopping:
                    save(run, step)
                    done.last_checkpoint = step
                if stopping:
                    done.status = "preempted" if stop_votes > 0 else "stopped"
                    run.say(f"stopped at step {step} ({done.status}); resume with --resume")
                    break
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
    return done


# --- the loop's helpers ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where :func:`fit` got to, and its tallies for the final metrics."""

    step: int
    last_checkpoint: int  # the step of the last checkpoint this run wrote or resumed from (-1: none)
    status: str = "completed"  # or "stopped" (stop_at_step) or "preempted" (SIGTERM)
    steps_run: int = 0
    steps_timed: int = 0  # steps counted in train_seconds (all but this run's first)
    train_seconds: float = 0.0
    pad_positions: int = 0
    positions: int = 0

    def metrics(self, run: Run, train_log: TrainLog, last_eval: dict[str, float], baselines: dict[str, float],
                *, seconds: float) -> dict[str, Any]:
        """The run's metrics for the summary and ``foresight.json``."""
        tokens_per_s = run.tokens_per_step * self.steps_timed / self.train_seconds if self.train_seconds else None
        peak = run.peak_flops
        train_records = train_log.of_kind("train")
        metrics = {
            "train_loss": train_records[-1]["loss"] if train_records else None,
            "tuning_loss": last_eval["loss"],
            "unigram_entropy_tuning": baselines["unigram_entropy"],
            "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
            "mfu": round(run.flops_token * tokens_per_s / (peak * run.world), 4) if peak and tokens_per_s else None,
            "padding_fraction": round(self.pad_positions / self.positions, 5) if self.positions else None,
            "steps": self.step,
            "tokens_seen": self.step * run.tokens_per_step,
            "seconds": round(seconds, 2),
        }
        if run.cfg.time_head:
            metrics["tuning_time_loss"] = last_eval.get("time_loss")
            metrics["constant_rate_time_nll_tuning"] = baselines["constant_rate_time_nll"]
        return metrics


def gap_bins(run: Run) -> GapBins | None:
    """The gap bins :func:`foresight.censoring.censored_loss` reads, on the run's device; None when ``[END]`` is
    an ordinary token (``end_as_censoring=False``)."""
    if not run.cfg.end_as_censoring:
        return None
    return GapBins.from_vocab(run.train_split.vocab).to(run.device)


def batch_for(run: Run, step: int) -> list[dict[str, Any]]:
    """This rank's micro-batches for optimiser step ``step``, as tensors on its device."""
    cfg = run.cfg
    rows = run.stream.step_rows(step, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, rank=run.rank,
                                world_size=run.world)
    return [collate(micro, run.device) for micro in rows]


def evaluate(run: Run, train_log: TrainLog, baselines: dict[str, float], at_step: int) -> dict[str, float]:
    """Loss on the tuning split (sharded over ranks), logged and said next to the context-free bars."""
    cfg = run.cfg
    res = estimate_loss(run.engine, run.tuning_split, cfg.seq_len, cfg.seed, cfg.eval_rows, cfg.micro_batch,
                        run.device, run.event_bias, run.rank, run.world, gap_bins(run))
    rec = {"kind": "eval", "step": at_step, "tuning_loss": res["loss"], **(
        {"tuning_time_loss": res["time_loss"]} if cfg.time_head else {})}
    train_log.write(rec)
    run.say(f"step {at_step}: tuning loss {res['loss']:.4f} (unigram entropy {baselines['unigram_entropy']:.4f})"
            + (f", time NLL {res['time_loss']:.4f} (constant rate {baselines['constant_rate_time_nll']:.4f})"
               if cfg.time_head else ""))
    return res


def save(run: Run, at_step: int) -> Path:
    """Checkpoint the run at ``at_step`` with what resuming it needs besides DeepSpeed's own state."""
    client = {"train_config": asdict(run.cfg), "data_fingerprint": run.vocab.fingerprint, "step": at_step,
              "epoch_rows": run.stream.epoch_rows}
    return save_checkpoint(run.engine, run.ckpt_dir, at_step, client, rank=run.rank, world_size=run.world,
                           keep=run.cfg.keep_checkpoints)


def _stop_if_diverged(run: Run, step: int, train_loss: float, time_loss: float | None) -> None:
    if not math.isfinite(train_loss) or (time_loss is not None and not math.isfinite(time_loss)):
        good = latest_checkpoint(run.ckpt_dir) if run.ckpt_dir.exists() else None
        raise DivergedError(f"loss became {train_loss} (time loss {time_loss}) at step {step}; nothing was "
                            f"saved after it; the last good checkpoint is "
                            f"{good or 'none (no checkpoint was written yet)'}; lower --lr or check the data")


def _step_record(run: Run, step: int, train_loss: float, time_loss: float | None, lr: float, dt: float, cpu: float,
                 rank_losses: list[float]) -> dict[str, Any]:
    """One ``train_log.jsonl`` line for an optimiser step."""
    tok_s = run.tokens_per_step / dt
    rec: dict[str, Any] = {"kind": "train", "step": step, "loss": train_loss, "lr": lr,
                           "tokens_per_s": round(tok_s, 1), "rank_losses": rank_losses, "seconds": round(dt, 4),
                           "cpu_seconds": round(cpu, 4)}  # this process's CPU time: robust to other jobs
    if time_loss is not None:
        rec["time_loss"] = time_loss
    grad_norm = run.engine.get_global_grad_norm()
    if grad_norm is not None:
        rec["grad_norm"] = float(grad_norm)
    if run.peak_flops:
        rec["mfu"] = round(run.flops_token * tok_s / (run.peak_flops * run.world), 4)
    return rec


@contextlib.contextmanager
def _sigterm_requests_stop() -> Iterator[Callable[[], bool]]:
    """SIGTERM (Slurm pre-emption, ``kill``) sets a flag the loop reads (finish the step, checkpoint, exit
    cleanly); yields the flag's reader. The previous handler is back on exit."""
    requested = {"flag": False}
    old_handler = None
    with contextlib.suppress(ValueError):  # not the main thread (e.g. a Prefect worker thread): no handler
        old_handler = signal.signal(signal.SIGTERM, lambda *_: requested.update(flag=True))
    try:
        yield lambda: requested["flag"]
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


class _InlineExecutor:
    """The ``submit``/``shutdown`` of an executor, running each call at once in the caller's thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, **_kwargs: Any) -> None:
        pass
