"""The history block (issue 16): a piece that continues a cut timeline, and a prompt cut to the context, start with
the distinct diagnosis/procedure codes recorded before the cut, built the same way in training and inference;
the block carries no loss; models trained without it are unchanged; the setting travels in foresight.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from foresight import tokens as T
from foresight import train as TR
from foresight.dataset import IGNORE_INDEX, PackedSplit
from foresight.forecast import Forecaster
from foresight.tokens.history import HistoryBlock

from .conftest import tiny_llama, tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("history")
    T.tokenize(tiny_warehouse(d / "w.duckdb", n_subjects=80), d / "tok", T.TokenizerConfig(min_subjects=3))
    return d / "tok"


def _expected_block(ps: PackedSplit, i: int, pos: int, cap: int) -> list[str]:
    """Written out the slow way: distinct DX/PX codes before the cut, first appearance first, the first ``cap``."""
    r = ps.index[i]
    seen: list[str] = []
    for t in ps.tokens[r["offset"] + r["head_len"]:pos]:
        name = ps.vocab.tokens[int(t)]
        if name.startswith(("DX//", "PX//")) and name not in seen:
            seen.append(name)
    return seen[:cap]


def test_continuation_pieces_start_with_the_history_block_and_carry_no_loss_on_it(tokens):
    ps = PackedSplit(tokens, "train", history=HistoryBlock(2))
    plain = PackedSplit(tokens, "train")
    plan = ps.plan(24, seed=0, epoch=0)
    blocks = 0
    for r in range(plan.n_rows):
        row = ps.row(plan, r)
        assert len(row["input_ids"]) == 24  # the block takes room from the body, never the row's width
        lo, hi = np.searchsorted(plan.row, [r, r + 1])
        at = 0
        for p in range(lo, hi):
            i, s = int(plan.subject[p]), int(plan.start[p])
            if not plan.continuation[p]:
                at += s - int(ps.index[i]["offset"]) + int(plan.length[p])
                continue
            head = int(ps.index[i]["head_len"])
            want = _expected_block(ps, i, s, 2)
            pre = ps.continuation_prefix(i, s)
            got = [ps.vocab.tokens[t] for t in pre[head:head + len(want)]]
            assert got == want
            # what follows the block is what a piece without one starts with: the markers at the cut
            assert pre[head + len(want):].tolist() == plain.continuation_prefix(i, s)[head:].tolist()
            for k in range(len(want)):  # no label targets a block token
                if at + head + k > 0:
                    assert row["labels"][at + head + k - 1] == IGNORE_INDEX
            blocks += bool(want)
            at += len(pre) + int(plan.length[p])
    assert blocks > 10
    # every body token of the split is still trained on exactly once per epoch
    body = int((ps.index["length"] - ps.index["prefix_len"]).sum())
    assert int(plan.length.sum()) == body


def test_a_block_of_kinds_the_data_lacks_changes_nothing(tokens):
    plain, empty = PackedSplit(tokens, "train"), PackedSplit(tokens, "train", history=HistoryBlock(4, ("NOPE",)))
    a, b = plain.plan(24, seed=0, epoch=0), empty.plan(24, seed=0, epoch=0)
    assert a.n_rows == b.n_rows and np.array_equal(a.start, b.start)
    for r in range(a.n_rows):
        ra, rb = plain.row(a, r), empty.row(b, r)
        assert all(np.array_equal(ra[k], rb[k]) for k in ("input_ids", "labels", "position_ids"))


def test_a_prompt_cut_to_the_context_carries_the_same_block(tokens):
    ps = PackedSplit(tokens, "train")
    r = ps.index[int(np.argmax(ps.index["length"]))]
    toks = np.asarray(ps.tokens[r["offset"]:r["offset"] + r["length"]], dtype=np.int64)
    head = int(r["head_len"])
    plain = Forecaster(tiny_llama(ps.vocab), ps.vocab, meta={"training": {"seq_len": 16}})
    fc = Forecaster(tiny_llama(ps.vocab), ps.vocab,
                    meta={"training": {"seq_len": 16, "history_block": 3, "history_kinds": ["DX"]}})
    assert plain.history is None and fc.history == HistoryBlock(3, ("DX",))
    cut, old = fc.fit_context(toks), plain.fit_context(toks)
    assert len(cut) <= 16 and cut[:head].tolist() == toks[:head].tolist()
    names = [ps.vocab.tokens[t] for t in cut]
    block = [t for t in names[head:] if t.startswith("DX//")]
    n_block = next(k for k, t in enumerate(names[head:]) if not t.startswith("DX//"))
    body_start = len(toks) - (len(cut) - head - n_block - 3)
    assert names[head:head + n_block] == [t for t in _expected_block(ps, int(np.argmax(ps.index["length"])),
                                                                     int(r["offset"]) + body_start, 3)
                                          if t.startswith("DX//")][:3]
    assert n_block >= 1 and block[:n_block] == names[head:head + n_block]
    # then the markers that hold at the end, then the most recent tokens
    assert [t.split("//")[0] for t in names[head + n_block:head + n_block + 3]] == ["YEAR", "MONTH", "AGE"]
    assert cut[head + n_block + 3:].tolist() == toks[body_start:].tolist()
    assert old[:head].tolist() == cut[:head].tolist() and len(old) == 16  # without a block: as before


def test_training_records_the_block_and_the_options_are_checked(tokens, tmp_path):
    with pytest.raises(ValueError, match="half of seq_len"):
        TR.TrainConfig(seq_len=32, history_block=17)
    assert TR.TrainConfig.from_dict({"history_block": 8, "history_kinds": "dx, px"}).history_kinds == ("DX", "PX")
    cfg = TR.TrainConfig(preset="tiny", seq_len=32, micro_batch=2, max_steps=1, warmup_steps=1, eval_every=0,
                         eval_rows=4, checkpoint_every=0, log_every=1000, history_block=4)
    TR.train(tokens, tmp_path / "m", cfg)
    card = json.loads((tmp_path / "m" / "foresight.json").read_text())
    assert card["training"]["history_block"] == 4 and card["training"]["history_kinds"] == ["DX", "PX"]
    assert Forecaster.from_pretrained(tmp_path / "m").history == HistoryBlock(4, ("DX", "PX"))
