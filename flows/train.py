"""The ``train`` flow: tokens -> a trained model directory.

One process (CPU or one GPU): the library's training loop runs inside the task. Several GPUs (or several CPU
ranks, or nodes through a hostfile): the task shells out to the DeepSpeed launcher, which starts one process
per rank running the same ``foresight train`` command, and streams their output to the Prefect log.
Re-running after a failure resumes from the run's latest checkpoint (``resume=True`` by default).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from foresight.train import TrainConfig
from foresight.train import train as train_model

# Variables a parent process may have set for its own (single-process) DeepSpeed run; the launcher must not
# inherit them, it sets its own for every rank.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_USE_AGENT_STORE")


def launcher_command(data: Path, out: Path, *, num_gpus: int, preset: str | None = None,
                     deepspeed_config: Path | None = None, max_steps: int | None = None,
                     hostfile: Path | None = None, resume: bool = True, extra: list[str] | None = None) -> list[str]:
    """The ``deepspeed`` launcher command that runs ``foresight train`` on ``num_gpus`` ranks per node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port",
           str(port), "--no_local_rank"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    cmd += ["--module", "foresight.cli", "train", "--data", str(data), "--out", str(out), "--json"]
    if preset:
        cmd += ["--preset", preset]
    if deepspeed_config:
        cmd += ["--deepspeed-config", str(deepspeed_config)]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if resume:
        cmd.append("--resume")
    return cmd + list(extra or [])


@task(cache_policy=NO_CACHE)
def train_in_process(data: Path, out: Path, cfg: TrainConfig, deepspeed_config: Path | None,
                     resume: bool) -> dict[str, Any]:
    """Run the training loop in this process (one rank)."""
    logger = get_run_logger()
    return train_model(data, out, cfg, deepspeed_config_path=deepspeed_config, resume=resume, log=logger.info)


@task(cache_policy=NO_CACHE)
def train_launched(data: Path, out: Path, cfg: TrainConfig, deepspeed_config: Path | None, num_gpus: int,
                   hostfile: Path | None, resume: bool) -> dict[str, Any]:
    """Run ``foresight train`` under the DeepSpeed launcher; every output line goes to the Prefect log."""
    logger = get_run_logger()
    cfg_file = Path(out) / "flow_train_config.json"  # every rank reads the whole config from it
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(asdict(cfg)))
    cmd = launcher_command(data, out, num_gpus=num_gpus, deepspeed_config=deepspeed_config, hostfile=hostfile,
                           resume=resume, extra=["--config", str(cfg_file)])
    logger.info("launching: %s", " ".join(cmd))
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            logger.info("%s", line)
    if proc.returncode != 0:
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"deepspeed launcher exited with {proc.returncode}; last lines:\n{tail}")
    # rank 0 prints the summary as one JSON line (the launcher may prefix it with the rank)
    for line in reversed(lines):
        start = line.find("{")
        if start >= 0:
            try:
                return json.loads(line[start:])
            except json.JSONDecodeError:
                continue
    raise RuntimeError("the launched run printed no JSON summary")


@flow(name="train")
def train(data: Path, out: Path, preset: str = "small", deepspeed_config: Path | None = None,
          max_steps: int | None = None, num_gpus: int = 1, hostfile: Path | None = None,
          options: dict[str, Any] | None = None, resume: bool = True) -> dict[str, Any]:
    """Train a model on ``data`` into ``out``. ``num_gpus`` > 1 (ranks per node: GPUs, or CPU processes on a
    CPU machine) or a ``hostfile`` goes through the DeepSpeed launcher; ``options`` are extra TrainConfig fields.
    """
    cfg = TrainConfig.from_dict({"preset": preset, **(options or {}),
                                 **({"max_steps": max_steps} if max_steps is not None else {})})
    if num_gpus > 1 or hostfile is not None:
        return train_launched(data, out, cfg, deepspeed_config, num_gpus, hostfile, resume)
    return train_in_process(data, out, cfg, deepspeed_config, resume)
