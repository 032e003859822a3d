"""Hostile cases for token folders (issue 17, #3 and #11's marker floor): a `tokenize` killed mid-run, folders
that are unfinished, mixed, old or foreign, a canary insertion that fails half-way, and warehouses whose YEAR
markers the old fit counted on events the encoder never writes a marker for.

Every warehouse is built here (``tiny_warehouse`` plus hand-written rows); the kill is a real SIGKILL of a
subprocess from inside tokenize's own progress callback, so nothing gets to clean up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from foresight import tokens as T
from foresight import warehouse
from foresight.dataset import PackedSplit
from foresight.hashing import sha256_file

from ..conftest import tiny_warehouse

K = 3  # the privacy floor of every warehouse here
CHUNK = 10  # subjects per chunk: a 120-subject warehouse takes several chunks per split

# tokenize in a subprocess that SIGKILLs itself after the first chunk of split argv[3] (a real crash: no
# finally, no atexit); argv[4] is the floor, so a rerun can fit a vocabulary that differs from the old one
KILL_TOKENIZE = r"""
import os, signal, sys
from foresight import tokens as T

db, out, when, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def progress(split, done, total):
    if split == when:
        os.kill(os.getpid(), signal.SIGKILL)

T.tokenize(db, out, T.TokenizerConfig(min_subjects=k, subjects_per_chunk=10), progress=progress)
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "foresight.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def _kill_tokenize(db: Path, out: Path, when: str, k: int = K) -> int:
    proc = subprocess.run([sys.executable, "-c", KILL_TOKENIZE, str(db), str(out), when, str(k)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # it really died mid-run
    return proc.returncode


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_warehouse(tmp_path_factory.mktemp("w") / "w.duckdb", n_subjects=120)


# --- #3: a killed tokenize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["train", "held_out"])  # during the first split, or after two were written
def test_killed_tokenize_leaves_the_previous_folder_intact_and_loadable(db, tmp_path, when):
    out = tmp_path / "tok"
    T.tokenize(db, out, T.TokenizerConfig(min_subjects=K, subjects_per_chunk=CHUNK))
    before = _digests(out)
    _kill_tokenize(db, out, when, k=5)  # another floor: a vocabulary that differs from the old one
    assert _digests(out) == before  # not one byte of the old folder changed
    split = PackedSplit(out, "train")
    assert len(split) > 50 and split.vocab.config.min_subjects == K
    assert (split.tokens < len(split.vocab.tokens)).all()  # shards and vocabulary still belong together


def test_killed_tokenize_without_an_old_folder_leaves_nothing_that_trains(db, tmp_path):
    out = tmp_path / "tok"
    _kill_tokenize(db, out, "tuning")
    assert not out.exists()  # no complete-looking folder at the target, only a hidden partial one beside it
    proc = _cli("train", "--data", str(out), "--out", str(tmp_path / "model"), "--preset", "tiny",
                "--max-steps", "1")
    assert proc.returncode != 0
    assert str(out) in proc.stderr and "foresight tokenize" in proc.stderr and "Traceback" not in proc.stderr
    # the next tokenize succeeds and removes the dead run's partial folder
    T.tokenize(db, out, T.TokenizerConfig(min_subjects=K, subjects_per_chunk=CHUNK))
    assert T.check_complete(out, "train")["fingerprint"] == T.Vocabulary.load(out / "vocab.json").fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_failed_tokenize_keeps_the_previous_folder(db, tmp_path, monkeypatch):
    """Not a kill: an exception half-way (here a disk error on the third chunk) also leaves the old folder."""
    out = tmp_path / "tok"
    T.tokenize(db, out, T.TokenizerConfig(min_subjects=K, subjects_per_chunk=CHUNK))
    before = _digests(out)
    calls = []

    def failing(split: str, done: int, total: int) -> None:
        calls.append(split)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        T.tokenize(db, out, T.TokenizerConfig(min_subjects=5, subjects_per_chunk=CHUNK), progress=failing)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # the partial folder was removed


# --- #3's neighbours: folders that are unfinished, mixed, old or foreign ---------------------------------------


@pytest.fixture()
def sealed(db, tmp_path) -> Path:
    out = tmp_path / "tok"
    T.tokenize(db, out, T.TokenizerConfig(min_subjects=K, subjects_per_chunk=CHUNK))
    return out


def test_folder_from_an_older_version_without_the_marker_is_refused(sealed, tmp_path):
    (sealed / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match=r"no COMPLETE marker.*re-run `foresight tokenize`") as exc:
        PackedSplit(sealed, "train")
    assert str(sealed) in str(exc.value)
    proc = _cli("train", "--data", str(sealed), "--out", str(tmp_path / "model"), "--preset", "tiny",
                "--max-steps", "1")
    assert proc.returncode != 0 and "no COMPLETE marker" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "model").exists()


def test_shards_of_another_run_beside_the_vocabulary_are_refused(db, sealed, tmp_path):
    """The corruption #3 produced in place: this folder's vocab.json with another tokenize's train shard."""
    other = tmp_path / "other"
    T.tokenize(db, other, T.TokenizerConfig(min_subjects=6, subjects_per_chunk=CHUNK))
    (sealed / "train.bin").write_bytes((other / "train.bin").read_bytes()[:-2])  # and a different size
    with pytest.raises(FileNotFoundError, match=r"train\.bin.*sealed at"):
        PackedSplit(sealed, "train")


def test_a_replaced_vocabulary_is_refused(db, sealed, tmp_path):
    other = tmp_path / "other"
    T.tokenize(db, other, T.TokenizerConfig(min_subjects=6, subjects_per_chunk=CHUNK))
    (sealed / "vocab.json").write_bytes((other / "vocab.json").read_bytes())
    for split in ("train", "tuning", "held_out"):  # every reader's split
        with pytest.raises(FileNotFoundError, match=r"vocab\.json: missing or changed"):
            PackedSplit(sealed, split)


def test_a_corrupt_marker_is_refused(sealed):
    (sealed / "COMPLETE").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="unreadable completion marker"):
        PackedSplit(sealed, "train")


def test_tokenize_into_a_folder_of_other_files_is_refused_and_deletes_nothing(db, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    proc = _cli("tokenize", "--db", str(db), "--out", str(out), "--min-subjects", str(K))
    assert proc.returncode != 0 and "notes.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_tokenize_onto_a_file_is_refused(db, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(T.TokenizeError, match="not a folder"):
        T.tokenize(db, target, T.TokenizerConfig(min_subjects=K))
    assert target.read_text() == "x"


def test_retokenize_replaces_a_sealed_folder_whole(db, sealed):
    (sealed / "train.bin").unlink()  # even a damaged old folder is replaced by a whole new one
    T.tokenize(db, sealed, T.TokenizerConfig(min_subjects=5, subjects_per_chunk=CHUNK))
    assert PackedSplit(sealed, "train").vocab.config.min_subjects == 5


def test_canary_copy_is_sealed_and_a_failed_insert_leaves_no_folder(sealed, tmp_path, monkeypatch):
    from privacy import canaries

    dst = tmp_path / "canaried"
    manifest = canaries.insert(sealed, dst, repeats=(1, 2), per_repeat=2, n_references=20)
    split = PackedSplit(dst, "train")  # its own marker vouches for its own vocab.json and longer train split
    assert len(split) == len(PackedSplit(sealed, "train")) + manifest["canary_subjects"]
    assert T.check_complete(dst)["fingerprint"] != T.check_complete(sealed)["fingerprint"]

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(canaries.np, "save", boom)
    with pytest.raises(OSError):
        canaries.insert(sealed, tmp_path / "second", repeats=(1,), per_repeat=2, n_references=20)
    assert not (tmp_path / "second").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".second")]


def test_canary_insert_refuses_an_unfinished_source(sealed, tmp_path):
    (sealed / "COMPLETE").unlink()
    proc = _cli("privacy", "insert-canaries", "--data", str(sealed), "--out", str(tmp_path / "c"))
    assert proc.returncode != 0 and "no COMPLETE marker" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()


# --- #11: the vocabulary floor counted YEAR markers the encoder does not write ---------------------------------

# Each case: two train subjects whose timed events all lie in year Y (so the encoder writes YEAR//Y for them)
# and a third whose true event times put it in Y too, but for whom the encoder writes no Y marker. The old fit
# counted true event years: 3 subjects >= K, so YEAR//Y (and AGE//Y-1900) became tokens written for 2 < K.
BORN = "1900-01-01"
CASES = {
    # a timed static fact goes to the static prefix: no marker is written at its time
    "timed static fact": (1939, [("1939-03-01", "DX//ICD10CM//I10"), ("1939-03-09", "DISCHARGE//HOME")],
                          [("2021-05-01", "DX//ICD10CM//I10"), ("1939-06-01", "GENDER//F")]),
    # timestamps under 5 minutes apart share one token clock: the second stamp's new year is never written
    "stamps merged under 5 minutes": (1920, [("1920-03-01", "DX//ICD10CM//I10"), ("1920-03-09", "DISCHARGE//HOME")],
                                      [("1919-12-31 23:58", "DX//ICD10CM//I10"),
                                       ("1920-01-01 00:01", "DISCHARGE//HOME")]),
    # after a gap of 21 years and ~7 months the token clock (TIME//1Y x21 + TIME//6MO-1Y, ~258 days) runs ahead
    # of the truth into the next year: the encoder writes YEAR//1940 for an event of December 1939
    "token clock ahead of the truth": (1939, [("1939-03-01", "DX//ICD10CM//I10"), ("1939-03-09", "DISCHARGE//HOME")],
                                       [("1918-05-15", "DX//ICD10CM//I10"), ("1939-12-10", "DISCHARGE//HOME")]),
}


def _marker_warehouse(path: Path, normal: list[tuple[str, str]], odd: list[tuple[str, str]]) -> Path:
    tiny_warehouse(path, n_subjects=60)
    rows = []
    for sid, events in ((5001, normal), (5002, normal), (5003, odd)):
        rows.append((sid, BORN, "MEDS_BIRTH"))
        rows += [(sid, t, code) for t, code in events]
    with warehouse.connect(path) as con:
        con.executemany("INSERT INTO events VALUES (?, ?::TIMESTAMP, ?, NULL, NULL, NULL, NULL, 't', 't', 't')", rows)
        con.execute("INSERT INTO subject_splits VALUES (5001, 'train'), (5002, 'train'), (5003, 'train')")
        con.execute("INSERT INTO codes SELECT DISTINCT code, NULL, fs_kind(code), [], 'test' FROM events "
                    "WHERE code NOT IN (SELECT code FROM codes)")
    return path


def _marker_subjects(data: Path) -> dict[str, int]:
    """Distinct train subjects per BIRTH/YEAR/AGE token, counted from the written train shard itself."""
    vocab = T.Vocabulary.load(data / "vocab.json")
    idx = np.load(data / "train.index.npy")
    toks = np.fromfile(data / "train.bin", dtype=vocab.dtype).astype(np.int64)
    subj = np.repeat(idx["subject_id"], idx["length"])
    pairs = np.unique(np.stack([toks, subj]), axis=1)
    per_token = np.bincount(pairs[0], minlength=len(vocab.tokens))
    return {t: int(per_token[i]) for i, t in enumerate(vocab.tokens)
            if t.startswith(("BIRTH//", "YEAR//", "AGE//")) and t.split("//")[1] not in ("RARE", "UNK")}


@pytest.mark.parametrize("case", list(CASES))
def test_every_marker_token_is_written_for_at_least_the_floor_of_train_subjects(tmp_path, case):
    year, normal, odd = CASES[case]
    db = _marker_warehouse(tmp_path / "w.duckdb", normal, odd)
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=K))
    counts = _marker_subjects(tmp_path / "tok")
    below = {t: n for t, n in counts.items() if n < K}
    assert not below, f"marker tokens written for fewer than {K} train subjects: {below}"
    # the case is a real one: the year's two subjects are in the shard (under YEAR//RARE now)
    vocab = T.Vocabulary.load(tmp_path / "tok" / "vocab.json")
    assert vocab.marker_map["YEAR"].get(str(year)) is None
    assert any(t.startswith("YEAR//") for t in counts)  # and the ordinary years still are tokens


def test_retokenize_through_a_symlink_replaces_the_folder_and_keeps_the_link(db, sealed, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(sealed, target_is_directory=True)
    T.tokenize(db, link, T.TokenizerConfig(min_subjects=5, subjects_per_chunk=CHUNK))
    assert link.is_symlink() and PackedSplit(link, "train").vocab.config.min_subjects == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "tok"]  # nothing left aside
