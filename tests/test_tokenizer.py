"""Tokenizer and packed dataset: privacy floor, train-only fitting, exact round trip, monotone clocks, packing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from foresight import tokenizer as T
from foresight import warehouse
from foresight.dataset import IGNORE_INDEX, PackedSplit
from foresight.schema import SPLITS

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
            fails += not np.array_equal(again.tokens, seq)
    return n, fails


@pytest.fixture(scope="module")
def demo_tokens(demo_db: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tokens")
    summary = T.tokenize(demo_db, out, T.TokenizerConfig(min_subjects=5))
    return out, summary


def test_demo_splits_never_share_a_subject(demo_db, demo_tokens):
    data, _ = demo_tokens
    vocab = T.Vocabulary.load(data / "vocab.json")
    seen = {}
    for split in SPLITS:
        ids = set(_split_arrays(data, split, vocab)[0]["subject_id"].tolist())
        for other, other_ids in seen.items():
            assert not ids & other_ids, (split, other)
        seen[split] = ids
    con = warehouse.connect(demo_db, read_only=True)
    try:
        truth = dict(con.execute("SELECT subject_id, split FROM subject_splits").fetchall())
    finally:
        con.close()
    assert all(truth[s] == split for split, ids in seen.items() for s in ids)
    assert sum(len(v) for v in seen.values()) == 100


def test_demo_vocabulary_respects_the_privacy_floor(demo_db, demo_tokens):
    data, _ = demo_tokens
    vocab = T.Vocabulary.load(data / "vocab.json")
    k = vocab.config.min_subjects
    # 1. codes: recount distinct train subjects per token straight from the warehouse through the code map
    con = warehouse.connect(demo_db, read_only=True)
    try:
        pairs = con.execute("SELECT DISTINCT e.code, e.subject_id FROM events e JOIN subject_splits s "
                            "USING (subject_id) WHERE s.split = 'train' AND e.code <> 'MEDS_BIRTH'").fetchall()
    finally:
        con.close()
    con = warehouse.connect(demo_db, read_only=True)
    try:
        mapping = T.map_codes(con, vocab)
    finally:
        con.close()
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
    vocab = T.Vocabulary.load(data / "vocab.json")
    lower = {t: int(m.group(1)) for t in vocab.tokens if (m := re.match(r"^(?:AGE|YEAR)//(\d+)", t))}
    for split in SPLITS:
        idx, toks, clock = _split_arrays(data, split, vocab)
        for r in idx:
            sl = slice(r["offset"], r["offset"] + r["length"])
            assert (np.diff(clock[sl]) >= 0).all(), r["subject_id"]
            for prefix in ("AGE//", "YEAR//"):
                seq = [lower[vocab.tokens[t]] for t in toks[sl] if vocab.tokens[t].startswith(prefix)
                       and vocab.tokens[t] in lower]
                assert seq == sorted(seq), (r["subject_id"], prefix, seq)
    # the clock tracks the record to the bins' resolution: half of all timestamps within ~1 hour
    assert summary["clock_error_hours"]["train"]["p50"] < 1.0


def test_quantile_edges_come_from_train_only(demo_db, demo_tokens, tmp_path):
    data, _ = demo_tokens
    copy = tmp_path / "w.duckdb"
    shutil.copy(demo_db, copy)
    con = warehouse.connect(copy)
    try:
        changed = con.execute(
            "UPDATE events SET numeric_value = numeric_value * 1000 + 7 WHERE numeric_value IS NOT NULL AND "
            "subject_id IN (SELECT subject_id FROM subject_splits WHERE split <> 'train')").fetchall()[0][0]
    finally:
        con.close()
    assert changed > 1000
    T.tokenize(copy, tmp_path / "tok", T.TokenizerConfig(min_subjects=5))
    original = T.Vocabulary.load(data / "vocab.json")
    perturbed = T.Vocabulary.load(tmp_path / "tok" / "vocab.json")
    assert perturbed.quantile_edges == original.quantile_edges
    assert perturbed.tokens == original.tokens and perturbed.marker_map == original.marker_map
    con = warehouse.connect(copy, read_only=True)
    try:
        assert T.map_codes(con, perturbed) == T.map_codes(con, original)
    finally:
        con.close()


def test_vocabulary_file_names_no_code_below_the_floor(demo_db, demo_tokens):
    data, _ = demo_tokens
    vocab = T.Vocabulary.load(data / "vocab.json")
    text = (data / "vocab.json").read_text()
    con = warehouse.connect(demo_db, read_only=True)
    try:
        mapping = T.map_codes(con, vocab)
    finally:
        con.close()
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


# --- small hand-built warehouses (no shared data needed) ----------------------------------------------------


def _tiny_warehouse(path: Path, n_subjects: int = 60, seed: int = 0) -> Path:
    """A synthetic warehouse: births, sexes, admissions with labs (values) and diagnoses, a few deaths."""
    rng = np.random.default_rng(seed)
    rows = []
    t_base = datetime(2020, 1, 1)
    for sid in range(1, n_subjects + 1):
        birth = datetime(1940 + int(rng.integers(0, 40)), int(rng.integers(1, 13)), 1)
        rows.append((sid, birth, "MEDS_BIRTH", None))
        rows.append((sid, None, "GENDER//" + ("F" if sid % 2 else "M"), None))
        t = t_base + timedelta(days=int(rng.integers(0, 300)))
        for _ in range(int(rng.integers(1, 5))):
            rows.append((sid, t, "ADMIT//EMERGENCY", None))
            for j in range(int(rng.integers(1, 6))):
                rows.append((sid, t + timedelta(hours=j * 6 + 1), "LAB//MIMIC//50912", float(rng.normal(1.0, 0.3))))
            rows.append((sid, t + timedelta(days=3), "DX//ICD10CM//" + str(rng.choice(["E119", "I10", "J189"])),
                         None))
            rows.append((sid, t + timedelta(days=3), "DISCHARGE//HOME", None))
            t += timedelta(days=int(rng.integers(20, 900)), minutes=int(rng.integers(0, 1000)))
        if sid % 7 == 0:
            rows.append((sid, t, "MEDS_DEATH", None))
    con = warehouse.connect(path)
    try:
        con.executemany("INSERT INTO events VALUES (?, ?, ?, ?, NULL, NULL, NULL, 'test', 'test', 'test')", rows)
        con.execute("INSERT INTO subject_splits SELECT DISTINCT subject_id, fs_split(subject_id) FROM events")
        con.execute("INSERT INTO codes SELECT DISTINCT code, NULL, fs_kind(code), [], 'test' FROM events")
    finally:
        con.close()
    return path


def test_empty_warehouse_is_a_clear_error(tmp_path):
    warehouse.connect(tmp_path / "w.duckdb").close()
    with pytest.raises(T.TokenizeError, match="no events"):
        T.tokenize(tmp_path / "w.duckdb", tmp_path / "tok")


def test_static_only_subject_and_round_trip_on_synthetic(tmp_path):
    db = _tiny_warehouse(tmp_path / "w.duckdb")
    con = warehouse.connect(db)
    try:  # subject 1000 has only a sex and a birth: no timed event at all
        con.execute("INSERT INTO events VALUES (1000, NULL, 'GENDER//F', NULL, NULL, NULL, NULL, 't', 't', 't'), "
                    "(1000, '1950-01-01', 'MEDS_BIRTH', NULL, NULL, NULL, NULL, 't', 't', 't')")
        con.execute("INSERT INTO subject_splits VALUES (1000, fs_split(1000))")
        split = con.execute("SELECT split FROM subject_splits WHERE subject_id = 1000").fetchall()[0][0]
    finally:
        con.close()
    summary = T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    assert summary["subjects"]["train"] > 30
    vocab = T.Vocabulary.load(tmp_path / "tok" / "vocab.json")
    ps = PackedSplit(tmp_path / "tok", split)
    i = int(np.flatnonzero(ps.index["subject_id"] == 1000)[0])
    assert [vocab.tokens[t] for t in ps.subject_tokens(i)] == ["[BOS]", "GENDER//F", "BIRTH//1950-1954", "[END]"]
    n, fails = _round_trip_failures(tmp_path / "tok")
    assert fails == 0 and n == 61
    # deaths end the record with MEDS_DEATH, everyone else with END
    train = PackedSplit(tmp_path / "tok", "train")
    for j in range(len(train)):
        last = vocab.tokens[int(train.subject_tokens(j)[-1])]
        assert last == ("MEDS_DEATH" if train.index[j]["subject_id"] % 7 == 0 else "[END]")


def test_dedup_window_drops_close_repeats(tmp_path):
    db = _tiny_warehouse(tmp_path / "w.duckdb")
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
    db = _tiny_warehouse(tmp_path / "w.duckdb", n_subjects=80)
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
    db = _tiny_warehouse(tmp_path / "w.duckdb", n_subjects=80)
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    ps = PackedSplit(tmp_path / "tok", "train")
    plan = ps.plan(40, seed=0, epoch=0)
    p = int(np.flatnonzero(plan.continuation)[-1])
    i, pos = int(plan.subject[p]), int(plan.start[p])
    pre = [ps.vocab.tokens[t] for t in ps.continuation_prefix(i, pos)]
    # the markers are the latest YEAR/AGE tokens at or before the cut in the subject's own timeline
    toks = [ps.vocab.tokens[t] for t in ps.tokens[ps.index[i]["offset"]:pos]]
    assert pre[-2] == [t for t in toks if t.startswith("YEAR//")][-1]
    assert pre[-1] == [t for t in toks if t.startswith("AGE//")][-1]
    assert pre[0] == "[BOS]"


# --- simulator output ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from foresight.simulate import simulate
    from foresight.sources import meds

    d = tmp_path_factory.mktemp("simtok")
    simulate(400, d / "sim", seed=3)
    con = warehouse.connect(d / "w.duckdb")
    try:
        meds.load(con, d / "sim")
    finally:
        con.close()
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
