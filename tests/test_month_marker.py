"""Calendar-month markers (``MONTH//01``..``MONTH//12``, issue 18's seasonality): where the encoder writes them,
that vocabularies saved before them encode exactly as before, and that every rebuild of "the markers that hold
here" (training continuation rows, forecast prompts cut to the context, token-folder index) carries them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from foresight import tokens as T
from foresight import warehouse
from foresight.dataset import PackedSplit
from foresight.evaluate.crosssource import token_map
from foresight.forecast import Forecaster
from foresight.forecast.months import MonthClock
from privacy.vocab_floor import is_exempt

from .conftest import alive_timelines, tiny_llama, tiny_warehouse


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny warehouse tokenized twice: with MONTH markers (today's default) and without (the old layout)."""
    d = tmp_path_factory.mktemp("month")
    db = tiny_warehouse(d / "w.duckdb", n_subjects=80)
    T.tokenize(db, d / "month", T.TokenizerConfig(min_subjects=3))
    T.tokenize(db, d / "old", T.TokenizerConfig(min_subjects=3, month_tokens=False))
    return {"db": db, "month": d / "month", "old": d / "old"}


def _encode(db: Path, vocab: T.Vocabulary) -> T.EncodedChunk:
    with warehouse.connect(db, read_only=True) as con:
        T.register_code_map(con, vocab)
        return T.encode_subjects(con, vocab, 0, 10**9)


def test_month_markers_are_written_where_the_clock_changes_month(folders):
    vocab = T.Vocabulary.load(folders["month"] / "vocab.json")
    assert vocab.config.month_tokens and [t for t in vocab.tokens if t.startswith("MONTH//")] == \
        [f"MONTH//{m:02d}" for m in range(1, 13)]
    chunk = _encode(folders["db"], vocab)
    names = [vocab.tokens[t] for t in chunk.tokens]
    month_of = T.months_of(chunk.clock_s)
    written = changed = 0
    for s in range(len(chunk.subject_ids)):
        lo, hi = int(chunk.offsets[s]), int(chunk.offsets[s + 1])
        current, prev_group = None, None
        for k in range(lo, hi):
            name = names[k]
            if name.startswith("MONTH//"):
                written += 1
                # the clock's month, written before AGE and after YEAR/intervals, only when it changed
                assert int(name[len("MONTH//"):]) == month_of[k]
                assert not names[k + 1].startswith(("YEAR//", "TIME//")) and names[k - 1] != name
                assert current is None or int(name[len("MONTH//"):]) != current
                current = int(name[len("MONTH//"):])
            elif vocab.is_event[chunk.tokens[k]] and not vocab.is_static[chunk.tokens[k]]:
                assert current == month_of[k], f"code {name} of month {month_of[k]} under MONTH {current}"
                if prev_group is not None and month_of[k] != prev_group:
                    changed += 1
                prev_group = month_of[k]
    assert written > len(chunk.subject_ids) and changed > 0  # first timestamps and changes both happened
    # decode ignores the markers: encode -> decode -> encode is still the identity
    start = T.from_epoch(int(chunk.t0_s[0]))
    events = T.decode(vocab, chunk.tokens[chunk.offsets[0]:chunk.offsets[1]], start_time=start)
    assert not any(e["code"].startswith("MONTH//") for e in events)


def test_a_vocabulary_saved_before_month_markers_encodes_byte_identically(folders, tmp_path):
    # an old vocab.json: no month_tokens key at all
    raw = json.loads((folders["old"] / "vocab.json").read_text())
    raw["config"].pop("month_tokens")
    (tmp_path / "vocab.json").write_text(json.dumps(raw))
    old = T.Vocabulary.load(tmp_path / "vocab.json")
    assert old.config.month_tokens is False and not any(t.startswith("MONTH//") for t in old.tokens)
    assert T.TokenizerConfig.from_options({}).month_tokens is True  # new fits get them
    assert old.tokens == T.Vocabulary.load(folders["old"] / "vocab.json").tokens
    for split in ("train", "held_out"):
        assert (folders["old"] / f"{split}.bin").read_bytes() == \
            _split_bytes(folders["db"], old, split), split
    # the month layout is exactly the old one plus MONTH markers (and its clock / first-marker index agree)
    new = T.Vocabulary.load(folders["month"] / "vocab.json")
    a = [old.tokens[t] for t in np.fromfile(folders["old"] / "train.bin", dtype=old.dtype)]
    b = [new.tokens[t] for t in np.fromfile(folders["month"] / "train.bin", dtype=new.dtype)]
    assert [t for t in b if not t.startswith("MONTH//")] == a
    ia, ib = np.load(folders["old"] / "train.index.npy"), np.load(folders["month"] / "train.index.npy")
    timed = ia["t0"] != T.NO_TIME
    assert np.array_equal(ia["head_len"], ib["head_len"])  # first_markers counts MONTH with YEAR and AGE
    assert np.array_equal(ib["prefix_len"][timed], ia["prefix_len"][timed] + 1)


def _split_bytes(db: Path, vocab: T.Vocabulary, split: str) -> bytes:
    with warehouse.connect(db, read_only=True) as con:
        T.register_code_map(con, vocab)
        ids = con.execute("SELECT DISTINCT e.subject_id FROM events e JOIN subject_splits s USING (subject_id) "
                          "WHERE s.split = ? ORDER BY 1", [split]).fetchnumpy()["subject_id"]
        chunk = T.encode_subjects(con, vocab, int(ids[0]), int(ids[-1]), split)
    return chunk.tokens.astype(vocab.dtype).tobytes()


def test_continuation_rows_and_cut_prompts_carry_the_month(folders):
    ps = PackedSplit(folders["month"], "train")
    plan = ps.plan(24, seed=0, epoch=0)
    checked = 0
    for p in np.flatnonzero(plan.continuation):
        i, pos = int(plan.subject[p]), int(plan.start[p])
        if not ps.vocab.is_event[int(ps.tokens[pos])]:
            continue  # a row cut at a gap takes the markers of the timestamp it leads to, not the latest ones
        pre = [ps.vocab.tokens[t] for t in ps.continuation_prefix(i, pos)]
        before = [ps.vocab.tokens[t] for t in ps.tokens[ps.index[i]["offset"]:pos]]
        assert pre[-3:] == [[t for t in before if t.startswith(k)][-1] for k in ("YEAR//", "MONTH//", "AGE//")]
        assert len(pre) == ps._continuation_len(i, pos)
        checked += 1
    assert checked > 5
    # a forecast prompt cut to the context keeps the current MONTH marker too
    fc = Forecaster(tiny_llama(ps.vocab), ps.vocab, meta={"training": {"seq_len": 16}})
    r = ps.index[int(np.argmax(ps.index["length"]))]
    toks = np.asarray(ps.tokens[r["offset"]:r["offset"] + r["length"]], dtype=np.int64)
    cut = [ps.vocab.tokens[t] for t in fc.fit_context(toks)]
    full = [ps.vocab.tokens[t] for t in toks]
    head = int(r["head_len"])  # BOS, statics, birth band; then the markers that hold at the end
    assert len(cut) == 16 and cut[:head] == full[:head]
    assert cut[head:head + 3] == [[t for t in full if t.startswith(k)][-1] for k in ("YEAR//", "MONTH//", "AGE//")]


def test_cross_source_month_markers_and_privacy_exemption(folders):
    new = T.Vocabulary.load(folders["month"] / "vocab.json")
    old = T.Vocabulary.load(folders["old"] / "vocab.json")
    ids, _ = token_map(new, new)
    assert all(ids[new.index[f"MONTH//{m:02d}"]] == new.index[f"MONTH//{m:02d}"] for m in range(1, 13))
    token_map(new, old)  # data without months read by a model with them: fine
    with pytest.raises(ValueError, match="MONTH"):
        token_map(old, new)  # a model without months cannot drop them from a folder
    assert is_exempt("MONTH//07") and not is_exempt("MONTH//RARE")


def test_sampled_futures_write_the_clocks_month(folders):
    """An untrained model draws MONTH markers at random; the sampler writes the clock's month instead, and a due
    step (the clock entered a new month) holds no event, so expected counts do not count it twice."""
    vocab = T.Vocabulary.load(folders["month"] / "vocab.json")
    fc = Forecaster(tiny_llama(vocab), vocab, meta={"training": {"seq_len": 64}})
    tls = alive_timelines(fc, folders["db"], n=4)
    is_month = np.array([t.startswith("MONTH//") for t in vocab.tokens])
    gen = torch.Generator().manual_seed(0)
    batch = fc.sample_batch(tls, 3, 400, 1.0, 1.0, gen, 96)
    markers = 0
    for r, toks in enumerate(batch.tokens):
        tl = tls[r // 3]
        clock = T.months_of(T.to_epoch(tl.clock) + np.asarray(batch.elapsed_s[r]).astype(np.int64))
        current = int(T.months_of(np.array([T.to_epoch(tl.clock)]))[0])  # the future starts in its clock's month
        for k, t in enumerate(toks):
            if is_month[t]:
                markers += 1
                current = int(vocab.tokens[t][-2:])
                assert current == clock[k]
                assert k == 0 or vocab.tokens[toks[k - 1]].startswith(("TIME//", "YEAR//"))
            elif vocab.is_event[t]:
                assert current == clock[k], "an event under a stale MONTH marker"
    assert markers > 0
    # the rule itself: a due row keeps its gap/YEAR mass, the rest goes to the clock's month; others lose MONTH
    clock = MonthClock(vocab, tls[:1], 2)
    probs = torch.full((2, len(vocab.tokens)), 1.0 / len(vocab.tokens))
    month_s = 40 * 86400.0  # 40 days on: another month
    out = clock.constrain(probs, torch.arange(2), torch.tensor([0.0, month_s], dtype=torch.float64))
    assert torch.allclose(out.sum(-1), torch.ones(2)) and float(out[0, torch.from_numpy(is_month)].sum()) == 0
    due_month = int(T.months_of(np.array([T.to_epoch(tls[0].clock) + int(month_s)]))[0])
    assert float(out[1, torch.from_numpy(vocab.is_event)].sum()) == 0
    assert float(out[1, vocab.index[f"MONTH//{due_month:02d}"]]) > 0.5


def test_canaries_carry_the_month_markers_a_real_clock_would(folders, tmp_path):
    """A canary's long gaps are followed by the MONTH marker real timelines have there (else the model can tell
    canaries apart and once-seen ones look memorised); without MONTH markers the secrets are as before."""
    from privacy import canaries

    made = {name: canaries.insert(folders[name], tmp_path / name, repeats=(1,), per_repeat=3, n_references=200)
            for name in ("month", "old")}
    vocab = T.Vocabulary.load(folders["month"] / "vocab.json")
    reps = dict(zip(vocab.time_ids.tolist(), vocab.time_reps_s.tolist(), strict=True))
    seqs = [[vocab.tokens[t] for t in s] for s in made["month"]["references"]]
    assert any(t.startswith("MONTH//") for s in seqs for t in s)
    for s in seqs:
        for k, t in enumerate(s):
            if t.startswith("MONTH//"):
                assert s[k - 1].startswith("TIME//")
            elif t.startswith("TIME//") and 31 * 86400 <= reps[vocab.index[t]] < 330 * 86400:
                assert s[k + 1].startswith("MONTH//")  # a step of 1-11 months always changes the month
    old_vocab = T.Vocabulary.load(folders["old"] / "vocab.json")
    assert not any(old_vocab.tokens[t].startswith("MONTH//") for s in made["old"]["references"] for t in s)
