"""``train_log.jsonl`` (one JSON record per step and per evaluation) and the loss curve drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOG_FILE = "train_log.jsonl"


def read_log(path: Path, upto_step: int) -> list[dict[str, Any]]:
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


class TrainLog:
    """The run's records: every rank keeps them in memory (``records``); only the writer appends to the file.

    Opening it rewrites the file with ``records``, the steps before the one the run starts at, so the lines a
    killed run wrote after its last checkpoint are dropped.
    """

    def __init__(self, path: Path, records: list[dict[str, Any]], *, write: bool) -> None:
        self.path, self.records, self.write_file = path, records, write
        if write:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record."""
        self.records.append(rec)
        if self.write_file:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The records of one kind (``train`` or ``eval``), in order."""
        return [r for r in self.records if r.get("kind") == kind]


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
