"""Packed token shards and the training rows drawn from them.

A split on disk (written by :func:`foresight.tokens.tokenize`) is a flat memory-mapped array of token ids,
the token clock per token, and an index of subject boundaries. Training reads fixed-length rows:

- **Document masking, not one-patient windows.** A row is filled with consecutive pieces of different
  subjects; ``position_ids`` restart at 0 at every piece, which makes transformers build a block-diagonal
  causal mask (its packed-sequence path), so no token ever attends to another subject's tokens. The label that
  would predict across a piece boundary is ignored (-100). Nothing is padded except the few slots at the end
  of a row that cannot hold another prefix plus one token (reported as ``padding_fraction``; ~1% at 512).
- **Every piece starts with the static prefix.** A long timeline is cut into pieces; a continuation piece
  starts with the subject's head (BOS, sex, race, birth band) followed by the YEAR and AGE markers that hold
  at the cut, so the model always knows who the tokens are about and when. Cuts never separate a value token
  from its code.
- **Reproducible and resumable.** The row plan of an epoch is a pure function of (seed, epoch): subjects are
  shuffled, then packed; resuming at (epoch, row) continues exactly where an interrupted run stopped.
- **A row stream for training.** :class:`RowStream` maps a global row index to a row over consecutive epochs,
  so the rows of any optimiser step are a pure function of (seed, step); :func:`collate` stacks rows into
  tensors.
- **Time to the next event.** Each row also carries ``time_to_next_days``: at a position that ends a timestamp
  group (its label starts a later token-clock time) the gap in days to that next time, else 0. It feeds the
  optional exponential waiting-time loss of :mod:`foresight.model`; nothing else reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from foresight.tokens import (
    END,
    INDEX_DTYPE,
    MINUTE,
    NO_TIME,
    PAD,
    QUANTILE_PREFIX,
    Vocabulary,
    ages,
    check_complete,
    months_of,
    years_of,
)
from foresight.tokens.history import HistoryBlock

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RowPlan:
    """Which token slices fill which row; arrays are parallel over pieces (in row order)."""

    seq_len: int
    row: np.ndarray  # (n_pieces,) row index
    subject: np.ndarray  # index into the split's subject index
    start: np.ndarray  # absolute token offset of the piece's body slice
    length: np.ndarray  # body tokens in the piece
    continuation: np.ndarray  # bool: the piece continues a cut timeline (head + markers re-inserted)
    n_rows: int
    padding: int  # padded slots over all rows

    @property
    def padding_fraction(self) -> float:
        return self.padding / max(1, self.n_rows * (self.seq_len + 1))


def extract_end_seconds(vocab: Vocabulary) -> int | None:
    """The extract's end that tokenize recorded in the vocabulary's report (epoch seconds), or None."""
    end = vocab.report.get("extract_end")
    if not end:
        return None
    return int(datetime.fromisoformat(end).replace(tzinfo=UTC).timestamp())


class PackedSplit:
    """One split of a tokenized dataset: memory-mapped tokens, token clock and subject index."""

    def __init__(self, data_dir: str | Path, split: str, vocab: Vocabulary | None = None,
                 history: HistoryBlock | None = None) -> None:
        data_dir = Path(data_dir)
        # continuation pieces carry the history block (foresight.tokens.history) when the model is trained with one
        self.history = history
        # a folder that tokenize (or a canary insertion) did not finish, or that changed since, is refused here:
        # train, evaluate, the privacy audit and canary insertion all read shards through this class
        check_complete(data_dir, split)
        self.vocab = vocab or Vocabulary.load(data_dir / "vocab.json")
        self.split = split
        n = (data_dir / f"{split}.bin").stat().st_size // np.dtype(self.vocab.dtype).itemsize
        self.tokens = np.memmap(data_dir / f"{split}.bin", dtype=self.vocab.dtype, mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype=self.vocab.dtype)
        self.clock_min = np.memmap(data_dir / f"{split}.clock.bin", dtype=np.int32, mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype=np.int32)
        self.index = np.load(data_dir / f"{split}.index.npy")
        assert self.index.dtype == INDEX_DTYPE, f"{split}.index.npy has an unexpected layout"
        self._q_ids = np.array([i for i, t in enumerate(self.vocab.tokens) if t.startswith(QUANTILE_PREFIX)
                                and t[1:].isdigit()])
        self._pad = self.vocab.index[PAD]
        self._end = self.vocab.index.get(END, -1)
        self.extract_end_s = extract_end_seconds(self.vocab)
        if self.extract_end_s is None:  # a folder tokenized before the extract's end was recorded
            self.extract_end_s = self._last_event_s()

    def __len__(self) -> int:
        return len(self.index)

    def _last_event_s(self) -> int | None:
        """The latest last event over this split's subjects (epoch seconds): the extract's end as far as the
        split shows it, for folders that do not record it."""
        timed = self.index[(self.index["t0"] != NO_TIME) & (self.index["length"] > 0)]
        if not len(timed):
            return None
        last = np.asarray(self.clock_min[timed["offset"] + timed["length"] - 1], dtype=np.int64)
        return int((timed["t0"].astype(np.int64) + last * MINUTE).max())

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def subject_tokens(self, i: int) -> np.ndarray:
        r = self.index[i]
        return np.asarray(self.tokens[r["offset"]:r["offset"] + r["length"]], dtype=np.int64)

    def history_block(self, i: int, pos: int) -> np.ndarray:
        """The history block of subject ``i`` cut at absolute token position ``pos`` (empty without one)."""
        if self.history is None:
            return np.zeros(0, dtype=np.int64)
        r = self.index[i]
        return self.history.block(self.tokens[r["offset"] + r["head_len"]:pos], self.vocab)

    def continuation_prefix(self, i: int, pos: int) -> np.ndarray:
        """Head of subject ``i``, its history block (when the split has one), then the YEAR/MONTH/AGE markers that
        hold at absolute token position ``pos`` (in the encoder's order)."""
        r = self.index[i]
        head = np.asarray(self.tokens[r["offset"]:r["offset"] + r["head_len"]], dtype=np.int64)
        head = np.concatenate([head, self.history_block(i, pos)])
        cfg = self.vocab.config
        if r["t0"] == NO_TIME:
            return head
        clock = np.array([int(r["t0"]) + int(self.clock_min[pos]) * MINUTE], dtype=np.int64)
        markers = []
        if cfg.year_tokens:
            markers.append(int(self.vocab.marker_ids("YEAR", years_of(clock))[0]))
        if cfg.month_tokens:
            markers.append(int(self.vocab.marker_ids("MONTH", months_of(clock))[0]))
        if cfg.age_tokens:
            if r["birth"] == NO_TIME:
                markers.append(self.vocab.index["AGE//UNK"])
            else:
                markers.append(int(self.vocab.marker_ids("AGE", ages(clock, np.array([r["birth"]])))[0]))
        return np.concatenate([head, np.array(markers, dtype=np.int64)])

    def _markers_len(self, i: int) -> int:
        """How many YEAR/MONTH/AGE markers a continuation prefix of subject ``i`` carries."""
        cfg = self.vocab.config
        timed = self.index[i]["t0"] != NO_TIME
        return int(cfg.year_tokens) + int(cfg.month_tokens) + int(cfg.age_tokens) if timed else 0

    def _continuation_len(self, i: int, pos: int) -> int:
        return int(self.index[i]["head_len"]) + len(self.history_block(i, pos)) + self._markers_len(i)

    def plan(self, seq_len: int, *, seed: int, epoch: int, min_body: int = 2) -> RowPlan:
        """Pack every subject's timeline into rows of ``seq_len + 1`` tokens (inputs + shifted labels)."""
        width = seq_len + 1
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.index))
        rows, subj, start, length, cont = [], [], [], [], []
        row, fill, padding = 0, 0, 0
        q_ids = set(self._q_ids.tolist())
        for i in order:
            r = self.index[i]
            pos, end = int(r["offset"] + r["prefix_len"]), int(r["offset"] + r["length"])
            first = True
            while first or pos < end:
                pre = int(r["prefix_len"]) if first else self._continuation_len(i, pos)
                if pre + min(min_body, end - pos) > width:
                    raise ValueError(f"seq_len {seq_len} cannot hold a prefix of {pre} tokens plus a token")
                space = width - fill
                if space < pre + min(min_body, max(end - pos, 1)):
                    padding += space
                    row, fill = row + 1, 0
                    continue
                take = min(end - pos, space - pre)
                if pos + take < end and take > 1 and int(self.tokens[pos + take]) in q_ids:
                    take -= 1  # never separate a value token from its code
                rows.append(row)
                subj.append(i)
                start.append(pos)
                length.append(take)
                cont.append(not first)
                fill += pre + take
                pos += take
                first = False
                if fill == width:
                    row, fill = row + 1, 0
        if fill:
            padding += width - fill
            row += 1
        return RowPlan(seq_len, np.array(rows, dtype=np.int64), np.array(subj, dtype=np.int64),
                       np.array(start, dtype=np.int64), np.array(length, dtype=np.int64),
                       np.array(cont, dtype=bool), row, padding)

    def row(self, plan: RowPlan, r: int) -> dict[str, np.ndarray]:
        """Row ``r`` of a plan: ``input_ids``, ``labels``, ``position_ids`` and ``time_to_next_days``.

        Each array has ``plan.seq_len`` entries. ``time_to_next_days[t]`` is the token-clock gap in days from
        position ``t`` to its label when the label starts a later timestamp (0 elsewhere, and wherever the
        label is ignored).
        """
        lo, hi = np.searchsorted(plan.row, [r, r + 1])
        ids, pos_ids, clocks, starts, t0s = [], [], [], [], []
        summary: list[np.ndarray] = []  # positions (in the row) of history-block tokens: no loss on them
        n = 0
        for p in range(lo, hi):
            i, s, ln = int(plan.subject[p]), int(plan.start[p]), int(plan.length[p])
            if plan.continuation[p]:
                pre = self.continuation_prefix(i, s)
                head_len = int(self.index[i]["head_len"])
                n_block = len(pre) - head_len - self._markers_len(i)  # head, block, markers
                if n_block:
                    summary.append(n + head_len + np.arange(n_block))
                # the re-inserted head stands for the state just before the cut, so the clock of the last token
                # before the cut: a piece that starts with a TIME token then still shows the gap it encodes
                pre_clock = np.full(len(pre), int(self.clock_min[s - 1]), dtype=np.int64)
            else:
                off = int(self.index[i]["offset"])
                pre = np.asarray(self.tokens[off:s], dtype=np.int64)
                pre_clock = np.asarray(self.clock_min[off:s], dtype=np.int64)
            piece = np.concatenate([pre, np.asarray(self.tokens[s:s + ln], dtype=np.int64)])
            ids.append(piece)
            pos_ids.append(np.arange(len(piece)))
            clocks.append(np.concatenate([pre_clock, np.asarray(self.clock_min[s:s + ln], dtype=np.int64)]))
            t0s.append(np.full(len(piece), int(self.index[i]["t0"]), dtype=np.int64))
            starts.append(n)
            n += len(piece)
        width = plan.seq_len + 1
        if n < width:  # the row's unusable tail: PAD, its own masked block, no loss
            ids.append(np.full(width - n, self._pad, dtype=np.int64))
            pos_ids.append(np.arange(width - n))
            clocks.append(np.zeros(width - n, dtype=np.int64))
            t0s.append(np.full(width - n, NO_TIME, dtype=np.int64))
            starts.append(n)
        seq = np.concatenate(ids)
        positions = np.concatenate(pos_ids)
        clock = np.concatenate(clocks)
        labels = seq[1:].copy()
        boundary = np.zeros(width, dtype=bool)
        boundary[np.array(starts[1:], dtype=np.int64)] = True
        labels[boundary[1:]] = IGNORE_INDEX  # never predict the first token of the next piece
        labels[seq[1:] == self._pad] = IGNORE_INDEX
        if summary:
            labels[np.concatenate(summary) - 1] = IGNORE_INDEX  # the block is a summary, not events to predict
        gap_min = np.where(labels != IGNORE_INDEX, clock[1:] - clock[:-1], 0)
        return {"input_ids": seq[:-1], "labels": labels, "position_ids": positions[:-1],
                "time_to_next_days": np.maximum(gap_min, 0).astype(np.float32) / np.float32(1440.0),
                "censor_s": self._censor_seconds(labels, np.concatenate(t0s)[1:], clock[1:])}

    def _censor_seconds(self, labels: np.ndarray, t0: np.ndarray, clock: np.ndarray) -> np.ndarray:
        """Seconds from each position whose label is ``[END]`` to the extract's end (-1 elsewhere and where it is
        unknown): what :func:`foresight.censoring.censored_loss` reads. ``t0``/``clock``: the labels' own."""
        out = np.full(len(labels), -1.0, dtype=np.float32)
        if self.extract_end_s is None or self._end < 0:
            return out
        at_end = (labels == self._end) & (t0 != NO_TIME)
        out[at_end] = np.maximum(self.extract_end_s - (t0[at_end] + clock[at_end] * MINUTE), 0)
        return out


class RowStream:
    """Global row index -> a packed row, over consecutive epochs of :meth:`PackedSplit.plan` (seed, epoch).

    Epochs hold slightly different numbers of rows (packing depends on the shuffled order), so the index walks
    the epochs' row counts; only the plans near the current position are kept in memory.
    """

    def __init__(self, split: PackedSplit, seq_len: int, seed: int, epoch_rows: list[int] | None = None) -> None:
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.epoch_rows: list[int] = list(epoch_rows or [])  # known row counts per epoch (from a checkpoint)
        self._plans: dict[int, RowPlan] = {}

    def _plan(self, epoch: int) -> RowPlan:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self.split.plan(self.seq_len, seed=self.seed, epoch=epoch)
            if self._plans[epoch].n_rows == 0:
                raise ValueError(f"the {self.split.split} split has no rows to train on")
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
        """Global row ``g`` (see :meth:`PackedSplit.row`)."""
        epoch, r = self.locate(g)
        return self.split.row(self._plan(epoch), r)

    def step_rows(self, step: int, *, micro_batch: int, grad_accum: int, rank: int, world_size: int
                  ) -> list[list[dict[str, np.ndarray]]]:
        """Rank ``rank``'s rows for optimiser step ``step``: ``grad_accum`` micro-batches of ``micro_batch`` rows.

        ``global_row = step * global_batch + (micro * world_size + rank) * micro_batch + i``, a pure function of
        (seed, step), which is what makes a resumed run draw exactly the rows the interrupted one would have.
        """
        global_batch = micro_batch * grad_accum * world_size
        return [[self.row(step * global_batch + (m * world_size + rank) * micro_batch + i) for i in range(micro_batch)]
                for m in range(grad_accum)]


def collate(rows: list[dict[str, np.ndarray]], device: Any) -> dict[str, Any]:
    """Stack rows into (B, T) tensors on ``device``."""
    import torch

    return {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(device, non_blocking=True) for k in rows[0]}
