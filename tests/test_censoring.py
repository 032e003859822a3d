"""[END] as right-censoring at the extract's end: what tokenize records, what a row carries, what the loss is."""

from __future__ import annotations

import json
import math
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
import torch

from foresight import tokens as T
from foresight import warehouse
from foresight.censoring import GapBins, censored_loss, share_above
from foresight.dataset import PackedSplit
from foresight.model import next_token_loss


@pytest.fixture(scope="module")
def demo_tokens(demo_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("censor_tokens")
    T.tokenize(demo_db, out, T.TokenizerConfig(min_subjects=5))
    return out


def test_rows_carry_seconds_from_each_subjects_last_event_to_the_extract_end(demo_db, demo_tokens):
    """Checked against the warehouse's own last event per subject and its last event overall, within the token
    clock's recorded error (the token clock is the sum of the gap tokens' lengths: the clock the model learns)."""
    ps = PackedSplit(demo_tokens, "train")
    summary = json.loads((demo_tokens / "tokenize_summary.json").read_text())
    tolerance = summary["clock_error_hours"]["train"]["max"] * 3600 + 60
    with warehouse.connect(demo_db, read_only=True) as con:
        end = warehouse.extract_end(con)
        last = dict(con.execute("SELECT subject_id, epoch(max(time))::BIGINT FROM events "
                                "WHERE code <> 'MEDS_BIRTH' GROUP BY 1").fetchall())
    assert ps.vocab.report["extract_end"] == end.isoformat()
    end_s = int(end.replace(tzinfo=UTC).timestamp())
    plan = ps.plan(128, seed=0, epoch=0)
    end_id = ps.vocab.index[T.END]
    checked = 0
    for r in range(plan.n_rows):
        row = ps.row(plan, r)
        at_end = row["labels"] == end_id
        assert (row["censor_s"][~at_end] == -1).all()
        for p in np.flatnonzero(at_end):
            # the piece holding this position: its subject
            piece = np.searchsorted(plan.row, r) + np.searchsorted(np.cumsum(_piece_lengths(ps, plan, r)), p,
                                                                    side="right")
            sid = int(ps.index[int(plan.subject[piece])]["subject_id"])
            expect = end_s - last[sid]
            assert abs(float(row["censor_s"][p]) - expect) <= tolerance + 1e-6 * expect  # float32
            checked += 1
    assert checked >= 20  # most demo patients are alive at the end of their records


def _piece_lengths(ps: PackedSplit, plan, r: int) -> list[int]:
    lo, hi = np.searchsorted(plan.row, [r, r + 1])
    return [int(plan.length[p]) + (ps._continuation_len(int(plan.subject[p]), int(plan.start[p]))
                                   if plan.continuation[p] else
                                   int(plan.start[p] - ps.index[int(plan.subject[p])]["offset"]))
            for p in range(lo, hi)]


def test_censored_loss_is_minus_log_probability_of_no_event_before_the_end(demo_tokens):
    vocab = T.Vocabulary.load(demo_tokens / "vocab.json")
    bins = GapBins.from_vocab(vocab)
    end_id, v = vocab.index[T.END], len(vocab.tokens)
    logits = torch.randn(1, 3, v, generator=torch.Generator().manual_seed(0))
    event = int(np.flatnonzero(vocab.is_event)[0])
    labels = torch.tensor([[event, end_id, end_id]])
    r = torch.tensor([[-1.0, 10 * 86400.0, 3 * 365.25 * 86400.0]])  # 10 days; 3 years
    got, n = censored_loss(logits, labels, r, bins)
    p = torch.softmax(logits[0].double(), -1).numpy()
    expect = -math.log(p[0, event])
    # by hand, from the vocabulary's bin edges: every bin wholly above 10 days, the part above 10 days of the bin
    # holding it (log-uniform), the one-year token whole
    edges = [*vocab.time_lower_s.tolist(), math.inf]
    ten_days = 10 * 86400.0
    mass = 0.0
    for k, tid in enumerate(vocab.time_ids[:-1]):
        lo, hi = edges[k], edges[k + 1]
        share = 1.0 if lo >= ten_days else (0.0 if hi <= ten_days else
                                            (math.log(hi) - math.log(ten_days)) / (math.log(hi) - math.log(lo)))
        mass += p[1, tid] * share
    year = int(vocab.time_ids[-1])
    mass += p[1, year]
    expect += -math.log(mass) - math.log(p[2, year])  # 3 years: only "a year passes" is compatible
    assert n.item() == 3
    assert got.item() == pytest.approx(expect, rel=1e-5)
    # without censoring the same labels are plain cross-entropy on [END]
    plain, _ = next_token_loss(logits, labels)
    assert plain.item() == pytest.approx(-math.log(p[0, event]) - math.log(p[1, end_id]) - math.log(p[2, end_id]),
                                         rel=1e-5)


def test_learning_from_censored_positions_moves_mass_to_long_gaps_not_to_end(demo_tokens):
    """Fit a free next-token distribution to censored observations alone: [END] and every gap shorter than the
    censoring time lose their mass; the mass goes to the gaps that reach past it."""
    vocab = T.Vocabulary.load(demo_tokens / "vocab.json")
    bins = GapBins.from_vocab(vocab)
    end_id, v = vocab.index[T.END], len(vocab.tokens)
    logits = torch.zeros(1, 1, v, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    r = torch.tensor([[30 * 86400.0]])
    for _ in range(300):
        opt.zero_grad()
        loss, _ = censored_loss(logits, torch.tensor([[end_id]]), r, bins)
        loss.backward()
        opt.step()
    p = torch.softmax(logits[0, 0].detach(), -1)
    share = share_above(bins, torch.tensor([30 * 86400.0]))[0]
    assert p[end_id] < 1e-3
    assert float((p * share).sum()) > 0.95  # P(no event within 30 days) learnt
    assert float(p[bins.is_time & (bins.upper_s <= 30 * 86400.0)].sum()) < 1e-3  # no short gaps
