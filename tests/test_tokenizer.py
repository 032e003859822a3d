"""Tokenizer and packed dataset: privacy floor, train-only fitting, exact round trip, monotone clocks, packing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from foresight import sources, warehouse
from foresight import tokens as T
from foresight.dataset import IGNORE_INDEX, PackedSplit
from foresight.schema import SPLITS
from foresight.simulate import simulate

from .conftest import tiny_warehouse

EXEMPT = re.compile(r"^(\[.*\]|RARE|AGE//UNK|(BIRTH|YEAR|AGE)//RARE|TIME//.*|Q\d+)$")


def _split_arrays(data: Path, split: str, vocab: T.Vocabulary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.load(data / f"{split}.index.npy")
    toks = np.fromfile(data / f"{split}.bin", dtype=vocab.dtype).astype(np.int64)
    clock = np.fromfile(data / f"{split}.clock.bin", dtype=np.int32)
    return idx, toks, clock


def _round_trip_failures(data: Path) -> tuple[int, int]:
    """Decode every subject and re-encode it; count the subjects whose tokens differ."""
    vocab = T.Vocabulary.load(data / "vocab.json")
    n = fails = 0
    for split in SPLITS:
        idx, toks, _ = _split_arrays(data, split, vocab)
        for r in idx:
            n += 1
            seq = toks[r["offset"]:r["offset"] + r["length"]]
            start = T.from_epoch(r["t0"]) if r["t0"] != T.NO_TIME else T.from_epoch(0)
            birth = T.from_epoch(r["birth"]) if r["birth"] != T.NO_TIME else None
            events = T.decode(vocab, seq, start_time=start, birth_time=birth)
            births = {int(r["subject_id"]): T.to_epoch(e["time"]) for e in events if e["code"] == "MEDS_BIRTH"}
            events = [e for e in events if e["code"] != "MEDS_BIRTH"]
            again = T.encode_arrays(
                vocab,
                np.full(len(events), r["subject_id"]),
                np.array([T.to_epoch(e["time"]) if e["time"] else T.NO_TIME for e in events], dtype=np.int64),
                np.array([vocab.index[e["code"]] for e in events], dtype=np.int64),
                np.array([np.nan if e["numeric_value"] is None else e["numeric_value"] for e in events]),
                births,
            )
            if not events:  # a birth-only record: encode_subjects adds these after encode_arrays, the same way
                again = T.merge_static_only(vocab, again, [int(r["subject_id"])], births)
            fails += not np.array_equal(again.tokens, seq)
    return n, fails


@pytest.fixture(scope="module")
def demo_tokens(demo_db: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tokens")
    summary = T.tokenize(demo_db, out, T.TokenizerConfig(min_subjects=5))
    return out, summary


def _assert_splits_match_warehouse(db: Path, data: Path) -> dict[str, set[int]]:
    """No subject is in two splits' shards, and each is in the split ``subject_splits`` gives it."""
    vocab = T.Vocabulary.load(data / "vocab.json")
    seen: dict[str, set[int]] = {}
    for split in SPLITS:
        ids = set(_split_arrays(data, split, vocab)[0]["subject_id"].tolist())
        for other, other_ids in seen.items():
            assert not ids & other_ids, (split, other)
        seen[split] = ids
    with warehouse.connect(db, read_only=True) as con:
        truth = dict(con.execute("SELECT subject_id, split FROM subject_splits").fetchall())
    assert all(truth[s] == split for split, ids in seen.items() for s in ids)
    return seen


def _assert_clock_and_markers_monotone(data: Path) -> dict[str, int]:
    """In every split and subject: the token clock never decreases and AGE/YEAR band starts never go back.

    Returns the number of AGE/YEAR markers checked per split, so callers can see the check was not vacuous.
    """
    vocab = T.Vocabulary.load(data / "vocab.json")
    lower = {t: int(m.group(1)) for t in vocab.tokens if (m := re.match(r"^(?:AGE|YEAR)//(\d+)", t))}
    checked = {}
    for split in SPLITS:
        idx, toks, clock = _split_arrays(data, split, vocab)
        checked[split] = 0
        for r in idx:
            sl = slice(r["offset"], r["offset"] + r["length"])
            assert (np.diff(clock[sl]) >= 0).all(), (split, r["subject_id"])
            for prefix in ("AGE//", "YEAR//"):
                seq = [lower[vocab.tokens[t]] for t in toks[sl] if vocab.tokens[t].startswith(prefix)
                       and vocab.tokens[t] in lower]
                assert seq == sorted(seq), (split, r["subject_id"], prefix, seq)
                checked[split] += len(seq)
    return checked


def _perturb_non_train_values(db: Path) -> int:
    """Multiply every tuning/held-out numeric value by 1000 (+7) in place; the number of rows changed."""
    with warehouse.connect(db) as con:
        return con.execute(
            "UPDATE events SET numeric_value = numeric_value * 1000 + 7 WHERE numeric_value IS NOT NULL AND "
            "subject_id IN (SELECT subject_id FROM subject_splits WHERE split <> 'train')").fetchall()[0][0]


def _assert_same_fit(original: Path, perturbed: Path, db: Path) -> None:
    """Two tokenizer outputs fitted the same vocabulary: edges, tokens, marker bands and code map."""
    a, b = T.Vocabulary.load(original / "vocab.json"), T.Vocabulary.load(perturbed / "vocab.json")
    assert b.quantile_edges == a.quantile_edges
    assert b.tokens == a.tokens and b.marker_map == a.marker_map
    with warehouse.connect(db, read_only=True) as con:
        assert T.map_codes(con, b) == T.map_codes(con, a)


def test_demo_splits_never_share_a_subject(demo_db, demo_tokens):
    seen = _assert_splits_match_warehouse(demo_db, demo_tokens[0])
    assert sum(len(v) for v in seen.values()) == 100


def test_demo_unseen_codes_are_counted_per_split(demo_db, demo_tokens):
    """The summary's unseen_codes: codes of a split that no train event has (what the vocabulary cannot know)."""
    with warehouse.connect(demo_db, read_only=True) as con:
        codes = {split: {r[0] for r in con.execute(
            "SELECT DISTINCT code FROM events JOIN subject_splits USING (subject_id) WHERE split = ?",
            [split]).fetchall()} for split in SPLITS}
    want = {split: len(codes[split] - codes["train"]) for split in SPLITS}
    assert demo_tokens[1]["unseen_codes"] == want
    assert want["train"] == 0 and want["held_out"] > 0


def test_demo_vocabulary_respects_the_privacy_floor(demo_db, demo_tokens):
    data, _ = demo_tokens
    vocab = T.Vocabulary.load(data / "vocab.json")
    k = vocab.config.min_subjects
    # 1. codes: recount distinct train subjects per token straight from the warehouse through the code map
    with warehouse.connect(demo_db, read_only=True) as con:
        pairs = con.execute("SELECT DISTINCT e.code, e.subject_id FROM events e JOIN subject_splits s "
                            "USING (subject_id) WHERE s.split = 'train' AND e.code <> 'MEDS_BIRTH'").fetchall()
    with warehouse.connect(demo_db, read_only=True) as con:
        mapping = T.map_codes(con, vocab)
    per_token: dict[str, set[int]] = {}
    for code, sid in pairs:
        per_token.setdefault(mapping[code], set()).add(sid)
    low = {t: len(s) for t, s in per_token.items() if len(s) < k and not EXEMPT.match(t)}
    assert not low, f"tokens below the floor of {k}: {low}"
    # 2. everything the model sees: distinct train subjects per token id in the train shards
    idx, toks, _ = _split_arrays(data, "train", vocab)
    subj_of_tok = np.repeat(np.arange(len(idx)), idx["length"])
    pairs_seen = np.unique(np.stack([toks, subj_of_tok]), axis=1)
    counts = np.bincount(pairs_seen[0], minlength=len(vocab.tokens))
    below = {vocab.tokens[t]: int(c) for t, c in enumerate(counts) if 0 < c < k and not EXEMPT.match(vocab.tokens[t])}
    assert not below, below
    report = vocab.report
    assert report["codes_to_parent"] > 0 and report["codes_to_rare"] > 0  # both rules exercised on real data


def test_demo_round_trip_is_exact(demo_tokens):
    n, fails = _round_trip_failures(demo_tokens[0])
    assert n == 100 and fails == 0


def test_demo_clock_and_ages_never_go_backwards(demo_tokens):
    data, summary = demo_tokens
    _assert_clock_and_markers_monotone(data)
    # the clock tracks the record to the bins' resolution: half of all timestamps within ~1 hour
    assert summary["clock_error_hours"]["train"]["p50"] < 1.0


def test_quantile_edges_come_from_train_only(demo_db, demo_tokens, tmp_path):
    data, _ = demo_tokens
    copy = tmp_path / "w.duckdb"
    shutil.copy(demo_db, copy)
    assert _perturb_non_train_values(copy) > 1000
    T.tokenize(copy, tmp_path / "tok", T.TokenizerConfig(min_subjects=5))
    _assert_same_fit(data, tmp_path / "tok", copy)


def test_vocabulary_file_names_no_code_below_the_floor(demo_db, demo_tokens):
    data, _ = demo_tokens
    vocab = T.Vocabulary.load(data / "vocab.json")
    text = (data / "vocab.json").read_text()
    with warehouse.connect(demo_db, read_only=True) as con:
        mapping = T.map_codes(con, vocab)
    rare = [c for c, t in mapping.items() if t != c]
    assert len(rare) > 100
    assert not [c for c in rare if f'"{c}"' in text]  # not one rare code appears in the shipped vocabulary
    # and ages unseen in train but inside a token's band still get that band (no RARE that marks non-members)
    for kind, table in vocab.marker_map.items():
        values = sorted(int(v) for v in table)
        assert values == list(range(values[0], values[-1] + 1)) or kind == "YEAR", kind


def test_cli_tokenize_json(demo_db, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "foresight.cli", "tokenize", "--db", str(demo_db), "--out",
                           str(tmp_path / "tok"), "--min-subjects", "10", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["vocab_size"] == len(T.Vocabulary.load(tmp_path / "tok" / "vocab.json").tokens)
    assert set(payload["tokens"]) == set(SPLITS) and payload["seconds"] > 0
    for key in ("codes_kept", "codes_to_parent", "codes_to_rare", "events_to_parent", "events_to_rare"):
        assert key in payload["rare_mapping"]
    # the command writes what the library writes by default: no option left at a saved vocabulary's old rule
    assert T.Vocabulary.load(tmp_path / "tok" / "vocab.json").config == T.TokenizerConfig(min_subjects=10)


def test_user_options_take_todays_defaults_and_saved_configs_their_own():
    assert T.TokenizerConfig.from_options({"min_subjects": 3}) == T.TokenizerConfig(min_subjects=3)
    assert T.TokenizerConfig.from_dict({"min_subjects": 3}).clock_correction == float("inf")  # a pre-option save


# --- small hand-built warehouses (no shared data needed) ----------------------------------------------------


def test_empty_warehouse_is_a_clear_error(tmp_path):
    warehouse.connect(tmp_path / "w.duckdb").close()
    with pytest.raises(T.TokenizeError, match="no events"):
        T.tokenize(tmp_path / "w.duckdb", tmp_path / "tok")


def test_a_load_published_between_the_fit_and_the_shards_is_refused(tmp_path, monkeypatch):
    """The fit and the shards run on two connections (the fit's memory is given back before encoding): a load
    published in between would pair a vocabulary with shards of other data, so tokenize refuses and the previous
    folder stays."""
    import foresight.tokens.build as build

    db = tiny_warehouse(tmp_path / "w.duckdb")
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    before = (tmp_path / "tok" / "vocab.json").read_bytes()
    opened, real_connect = [], build.warehouse.connect

    def connect(path, *args, **kwargs):  # a writer slips in before the second (the shards') connection
        opened.append(path)
        if len(opened) == 2:
            with real_connect(path) as con:
                con.execute("INSERT INTO etl_runs VALUES ('late', 's', 'meds', 'x', '{}', now(), now(), 0, 0, 0, 0, "
                            "'{}', 0, 0, '[]', 'test')")
        return real_connect(path, *args, **kwargs)

    monkeypatch.setattr(build.warehouse, "connect", connect)
    with pytest.raises(T.TokenizeError, match="changed while it was being tokenized"):
        T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    assert len(opened) == 2 and (tmp_path / "tok" / "vocab.json").read_bytes() == before
    monkeypatch.undo()
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))  # run again: the new run is taken in
    assert T.Vocabulary.load(tmp_path / "tok" / "vocab.json").fingerprint != json.loads(before)["fingerprint"]


def test_static_only_subject_and_round_trip_on_synthetic(tmp_path):
    db = tiny_warehouse(tmp_path / "w.duckdb")
    with warehouse.connect(db) as con:  # no timed event at all: 1000 has a sex and a birth, 1003 only a birth,
        # 1002 only a sex
        con.execute("INSERT INTO events VALUES (1000, NULL, 'GENDER//F', NULL, NULL, NULL, NULL, 't', 't', 't'), "
                    "(1000, '1950-01-01', 'MEDS_BIRTH', NULL, NULL, NULL, NULL, 't', 't', 't'), "
                    "(1003, '1961-07-01', 'MEDS_BIRTH', NULL, NULL, NULL, NULL, 't', 't', 't'), "
                    "(1002, NULL, 'GENDER//M', NULL, NULL, NULL, NULL, 't', 't', 't')")
        con.execute("INSERT INTO subject_splits SELECT s, fs_split(s) FROM unnest([1000, 1002, 1003]) t(s)")
        splits = dict(con.execute("SELECT subject_id, split FROM subject_splits WHERE subject_id >= 1000").fetchall())
    summary = T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    assert summary["subjects"]["train"] > 30
    vocab = T.Vocabulary.load(tmp_path / "tok" / "vocab.json")
    expected = {1000: ["[BOS]", "GENDER//F", "BIRTH//1950-1954", "[END]"],
                1003: ["[BOS]", vocab.marker_map["BIRTH"]["1961"], "[END]"],
                1002: ["[BOS]", "GENDER//M", "BIRTH//RARE", "[END]"]}
    for sid, tokens in expected.items():
        ps = PackedSplit(tmp_path / "tok", splits[sid])
        i = int(np.flatnonzero(ps.index["subject_id"] == sid)[0])
        assert [vocab.tokens[t] for t in ps.subject_tokens(i)] == tokens, sid
    # they are counted per split and named in the summary (and its file), not encoded silently
    per_split = {s: sum(1 for v in splits.values() if v == s) for s in SPLITS}
    assert summary["static_only_subjects"] == per_split
    assert any(m.startswith("3 subjects have only static facts") and "BOS + static prefix + birth band + END" in m
               for m in summary["messages"]), summary["messages"]
    written = json.loads((tmp_path / "tok" / "tokenize_summary.json").read_text())
    assert written["static_only_subjects"] == per_split and written["messages"] == summary["messages"]
    n, fails = _round_trip_failures(tmp_path / "tok")
    assert fails == 0 and n == 63
    # deaths end the record with MEDS_DEATH, everyone else with END
    train = PackedSplit(tmp_path / "tok", "train")
    for j in range(len(train)):
        last = vocab.tokens[int(train.subject_tokens(j)[-1])]
        assert last == ("MEDS_DEATH" if train.index[j]["subject_id"] % 7 == 0 else "[END]")


def _band_width(token: str) -> int:
    """Years a marker token covers: ``YEAR//2021`` 1, ``BIRTH//1950-1954`` 5."""
    lo, _, hi = token.split("//", 1)[1].partition("-")
    return int(hi) - int(lo) + 1 if hi else 1


def test_marker_coarsening_is_counted(tmp_path):
    db = tiny_warehouse(tmp_path / "w.duckdb")
    summary = T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    vocab = T.Vocabulary.load(tmp_path / "tok" / "vocab.json")
    report = summary["markers_coarsened"]
    assert "markers" not in vocab.report  # counts of people stay with the shards, out of the shipped vocab.json
    with warehouse.connect(db, read_only=True) as con:  # recount births from the warehouse, and each one's band
        births = con.execute(
            "SELECT e.subject_id, year(e.time) FROM events e JOIN subject_splits s USING (subject_id) "
            "WHERE s.split = 'train' AND e.code = 'MEDS_BIRTH'").fetchall()
    # and calendar years from the train shards: the year of the token clock at every event the model sees
    idx, toks, clock = _split_arrays(tmp_path / "tok", "train", vocab)
    subj = np.repeat(np.arange(len(idx)), idx["length"])
    at = vocab.is_event[toks]
    years = T.years_of(idx["t0"][subj[at]] + clock[at].astype(np.int64) * 60)
    shard_years = list(zip(idx["subject_id"][subj[at]].tolist(), years.tolist(), strict=True))
    for kind, finest, rows in (("YEAR", 1, shard_years), ("BIRTH", vocab.config.birth_min_band, births)):
        hits = [(sid, y) for sid, y in rows if _band_width(vocab.marker_map[kind][str(y)]) > finest]
        assert report[kind]["finest_band_years"] == finest
        assert report[kind]["subjects_coarsened"] == len({sid for sid, _ in hits}), kind
        assert report[kind]["events_coarsened"] == len(hits), kind
        assert report[kind]["values_coarsened"] == len({y for _, y in hits}), kind
    # 60 subjects under a floor of 3 cannot all have single-year ages: the floor did coarsen, and it is said
    assert report["AGE"]["subjects_coarsened"] > 0 and report["YEAR"]["subjects_coarsened"] > 0
    assert any(m.startswith("AGE markers under the privacy floor") for m in summary["messages"])


def test_cli_tokenize_says_what_it_coarsened(tmp_path):
    db = tiny_warehouse(tmp_path / "w.duckdb")
    with warehouse.connect(db) as con:
        con.execute("INSERT INTO events VALUES (1003, '1961-07-01', 'MEDS_BIRTH', NULL, NULL, NULL, NULL, 't', "
                    "'t', 't')")
        con.execute("INSERT INTO subject_splits VALUES (1003, fs_split(1003))")
    proc = subprocess.run([sys.executable, "-m", "foresight.cli", "tokenize", "--db", str(db), "--out",
                           str(tmp_path / "tok"), "--min-subjects", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 subjects have only static facts" in proc.stderr
    assert "AGE markers under the privacy floor" in proc.stderr


def test_dedup_window_drops_close_repeats(tmp_path):
    db = tiny_warehouse(tmp_path / "w.duckdb")
    a = T.tokenize(db, tmp_path / "a", T.TokenizerConfig(min_subjects=3))
    b = T.tokenize(db, tmp_path / "b", T.TokenizerConfig(min_subjects=3, dedup_window_minutes=24 * 60))
    assert b["tokens"]["train"] < a["tokens"]["train"]
    vocab = T.Vocabulary.load(tmp_path / "b" / "vocab.json")
    lab = vocab.index["LAB//MIMIC//50912"]
    ps = PackedSplit(tmp_path / "b", "train")
    for j in range(len(ps)):  # labs 6 hours apart within a stay collapse to one per admission
        toks = ps.subject_tokens(j)
        admits = int((toks == vocab.index["ADMIT//EMERGENCY"]).sum())
        assert int((toks == lab).sum()) == admits


def test_packed_rows_mask_subjects_and_cover_every_token(tmp_path):
    db = tiny_warehouse(tmp_path / "w.duckdb", n_subjects=80)
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    ps = PackedSplit(tmp_path / "tok", "train")
    vocab = ps.vocab
    seq_len = 48  # short rows force long timelines to be cut into continuation pieces
    plan = ps.plan(seq_len, seed=1, epoch=0)
    assert plan.continuation.any()
    # every body token of every subject is in exactly one piece
    body = sum(int(r["length"] - r["prefix_len"]) for r in ps.index)
    assert int(plan.length.sum()) == body
    assert plan.padding_fraction < 0.1
    bos = vocab.index["[BOS]"]
    for r in range(plan.n_rows):
        row = ps.row(plan, r)
        assert all(len(v) == seq_len for v in row.values())
        starts = np.flatnonzero(row["position_ids"] == 0)
        pieces = [s for s in starts if row["input_ids"][s] == bos]
        # each piece begins with BOS, and the label that would cross into the next piece is ignored
        for s in pieces[1:]:
            assert row["labels"][s - 1] == IGNORE_INDEX
        for s in starts:
            assert row["input_ids"][s] in (bos, vocab.index["[PAD]"])
    # reproducible by (seed, epoch), different across epochs
    again = ps.plan(seq_len, seed=1, epoch=0)
    assert np.array_equal(again.subject, plan.subject) and np.array_equal(again.start, plan.start)
    assert not np.array_equal(ps.plan(seq_len, seed=1, epoch=1).subject, plan.subject)


def test_continuation_prefix_carries_current_age_and_year(tmp_path):
    db = tiny_warehouse(tmp_path / "w.duckdb", n_subjects=80)
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    ps = PackedSplit(tmp_path / "tok", "train")
    plan = ps.plan(40, seed=0, epoch=0)
    p = int(np.flatnonzero(plan.continuation)[-1])
    i, pos = int(plan.subject[p]), int(plan.start[p])
    pre = [ps.vocab.tokens[t] for t in ps.continuation_prefix(i, pos)]
    # the markers are the latest YEAR/MONTH/AGE tokens at or before the cut in the subject's own timeline
    toks = [ps.vocab.tokens[t] for t in ps.tokens[ps.index[i]["offset"]:pos]]
    assert pre[-3] == [t for t in toks if t.startswith("YEAR//")][-1]
    assert pre[-2] == [t for t in toks if t.startswith("MONTH//")][-1]
    assert pre[-1] == [t for t in toks if t.startswith("AGE//")][-1]
    assert pre[0] == "[BOS]"


# --- simulator output ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("simtok")
    simulate(400, d / "sim", seed=3)
    with warehouse.connect(d / "w.duckdb") as con:
        sources.load("meds", con, d / "sim")
    T.tokenize(d / "w.duckdb", d / "tok", T.TokenizerConfig(min_subjects=10))
    return d / "w.duckdb", d / "tok"


def test_simulator_output_round_trips_and_keeps_the_floor(sim_tokens):
    _, data = sim_tokens
    n, fails = _round_trip_failures(data)
    assert n >= 390 and fails == 0
    vocab = T.Vocabulary.load(data / "vocab.json")
    idx, toks, clock = _split_arrays(data, "train", vocab)
    subj_of_tok = np.repeat(np.arange(len(idx)), idx["length"])
    pairs_seen = np.unique(np.stack([toks, subj_of_tok]), axis=1)
    counts = np.bincount(pairs_seen[0], minlength=len(vocab.tokens))
    below = {vocab.tokens[t]: int(c) for t, c in enumerate(counts) if 0 < c < 10 and not EXEMPT.match(vocab.tokens[t])}
    assert not below, below
    # the simulator's lab values become value tokens, and ages/years are real calendar markers here
    assert len(vocab.quantile_edges) > 3
    assert any(t.startswith("AGE//") and t != "AGE//RARE" for t in vocab.tokens)
    for r in idx:
        assert (np.diff(clock[r["offset"]:r["offset"] + r["length"]]) >= 0).all()


def test_simulator_output_splits_are_disjoint_and_match_the_warehouse(sim_tokens):
    db, data = sim_tokens
    seen = _assert_splits_match_warehouse(db, data)
    with warehouse.connect(db, read_only=True) as con:
        with_events = {s for (s,) in con.execute("SELECT DISTINCT subject_id FROM events").fetchall()}
    # every subject with events is written to exactly one split, and every split is populated
    assert set().union(*seen.values()) == with_events
    assert all(len(ids) > 10 for ids in seen.values()), {s: len(v) for s, v in seen.items()}


def test_simulator_quantile_edges_come_from_train_only(sim_tokens, tmp_path):
    db, data = sim_tokens
    copy = tmp_path / "w.duckdb"
    shutil.copy(db, copy)
    assert _perturb_non_train_values(copy) > 1000
    T.tokenize(copy, tmp_path / "tok", T.TokenizerConfig(min_subjects=10))
    _assert_same_fit(data, tmp_path / "tok", copy)
    # the perturbation reached the shards (tuning values now land in other deciles) but not the train shard:
    # the edges are unchanged because train alone fixes them, not because the values were never read
    assert (tmp_path / "tok" / "train.bin").read_bytes() == (data / "train.bin").read_bytes()
    for split in ("tuning", "held_out"):
        assert (tmp_path / "tok" / f"{split}.bin").read_bytes() != (data / f"{split}.bin").read_bytes(), split


def test_simulator_clock_and_markers_never_go_backwards_in_any_split(sim_tokens):
    _, data = sim_tokens
    checked = _assert_clock_and_markers_monotone(data)
    assert all(n > 100 for n in checked.values()), checked  # real AGE/YEAR sequences in every split


def test_marker_values_are_the_encoders_markers(sim_tokens):
    """The fit counts YEAR/AGE on ``marker_values``: per timestamp group, the year and age at the token clock.
    Re-encoding each train subject, the YEAR/AGE tokens it holds are exactly the bands of those values."""
    _, data = sim_tokens
    vocab = T.Vocabulary.load(data / "vocab.json")
    idx, toks, _ = _split_arrays(data, "train", vocab)
    checked = 0
    for r in idx[:150]:
        seq = toks[r["offset"]:r["offset"] + r["length"]]
        start = T.from_epoch(r["t0"]) if r["t0"] != T.NO_TIME else T.from_epoch(0)
        events = [e for e in T.decode(vocab, seq, start_time=start) if e["time"] is not None]
        if not events:
            continue
        sid = np.full(len(events), r["subject_id"])
        t = np.array([T.to_epoch(e["time"]) for e in events], dtype=np.int64)
        tok = np.array([vocab.index[e["code"]] for e in events], dtype=np.int64)
        births = {int(r["subject_id"]): int(r["birth"])} if r["birth"] != T.NO_TIME else {}
        _, year, age, n = T.marker_values(vocab, sid, t, tok, np.full(len(events), np.nan), births)
        assert n.sum() == len(events)
        held = {vocab.tokens[x] for x in seq if vocab.tokens[x].startswith(("YEAR//", "AGE//"))}
        want = {vocab.tokens[x] for x in vocab.marker_ids("YEAR", year)}
        want |= {vocab.tokens[x] for x in vocab.marker_ids("AGE", age[age >= 0])} | ({"AGE//UNK"} if (age < 0).any()
                                                                                       else set())
        assert held == want, r["subject_id"]
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("correction", [0.5, float("inf")])
def test_stays_after_long_gaps_keep_their_length(tmp_path, correction):
    """Every 3-day stay of the tiny warehouse (stays 20-900 days apart, so the clock drifts by weeks after each
    long gap) keeps a positive length near 3 days in tokens with the bounded clock correction; unlimited error
    feedback, the old rule, squashes some of them to 0 (the test's own control that the case is hard)."""
    db = tiny_warehouse(tmp_path / "w.duckdb", n_subjects=120, seed=3)
    out = tmp_path / "tokens"
    T.tokenize(db, out, T.TokenizerConfig(min_subjects=5, clock_correction=correction))
    vocab = T.Vocabulary.load(out / "vocab.json")
    lengths = []
    for split in SPLITS:
        idx, toks, clock = _split_arrays(out, split, vocab)
        for r in idx:
            admit = None
            for tok, minute in zip(toks[r["offset"]:r["offset"] + r["length"]],
                                   clock[r["offset"]:r["offset"] + r["length"]], strict=True):
                name = vocab.tokens[tok]
                if name.startswith("ADMIT//"):
                    admit = int(minute)
                elif name.startswith("DISCHARGE//") and admit is not None:
                    lengths.append((int(minute) - admit) / 1440)
                    admit = None
    lengths = np.array(lengths)
    assert len(lengths) > 150
    if correction == 0.5:
        # each gap of a stay keeps its length within a factor 1 +- 0.5 (about the bins' own resolution)
        assert lengths.min() > 1.0 and lengths.max() < 6.5, (lengths.min(), lengths.max())
        assert abs(np.median(lengths) - 3.0) < 0.5
    else:
        assert (lengths == 0).any()


def test_quantile_edges_do_not_depend_on_the_batching(demo_db, demo_tokens, tmp_path, monkeypatch):
    """Codes are taken in batches to bound memory, and a code with more values than a batch is sorted and streamed;
    the edges must be bit for bit those of one query over all codes."""
    from foresight.tokens import fit

    streamed = []
    whole = fit.streamed_quantiles
    monkeypatch.setattr(fit, "quantile_batch_values", lambda con: 2_000)  # dozens of queries on the MIMIC demo
    monkeypatch.setattr(fit, "streamed_quantiles", lambda *a: streamed.append(a[1]) or whole(*a))
    T.tokenize(demo_db, tmp_path / "batched", T.TokenizerConfig(min_subjects=5))
    one = T.Vocabulary.load(demo_tokens[0] / "vocab.json").quantile_edges
    assert len(one) > 20
    assert len(streamed) >= 3  # codes with more than 2,000 values went the sorted-stream way
    assert T.Vocabulary.load(tmp_path / "batched" / "vocab.json").quantile_edges == one
