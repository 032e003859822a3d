"""Fine-tuning (``foresight train --init-from MODEL``): the run starts from the source model's weights, and only on
data numbered in the source model's vocabulary (another source is re-read in it first)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file

from foresight import tokens as T
from foresight import train as TR
from foresight import warehouse
from tests.conftest import cli_json, run_cli, tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"preset": "tiny", "seq_len": 64, "micro_batch": 4, "warmup_steps": 1, "eval_every": 0, "eval_rows": 4,
        "checkpoint_every": 0, "log_every": 1}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A source warehouse, its tokens and a model trained on them for a few steps (its weights moved off init)."""
    d = tmp_path_factory.mktemp("finetune")
    tiny_warehouse(d / "a.duckdb", n_subjects=60, seed=0)
    T.tokenize(d / "a.duckdb", d / "tok-a")
    TR.train(d / "tok-a", d / "model", TR.TrainConfig(**FAST, max_steps=3, lr=3e-3))
    return {"dir": d, "model": d / "model"}


def target_warehouse(path: Path) -> Path:
    """Another source: the same kind of records plus a diagnosis code the source never used, for every subject."""
    tiny_warehouse(path, n_subjects=60, seed=1)
    with warehouse.connect(path) as con:
        con.execute("INSERT INTO events SELECT DISTINCT subject_id, ?::TIMESTAMP, 'DX//ICD10CM//K359', NULL, NULL, "
                    "NULL, NULL, 'test', 'test', 'test' FROM events", [datetime(2021, 6, 1)])
        con.execute("INSERT INTO codes VALUES ('DX//ICD10CM//K359', NULL, 'DX', [], 'test')")
    return path


def weights(model_dir: Path) -> dict:
    return load_file(model_dir / "model.safetensors")


def test_init_from_starts_from_the_source_models_weights(source, tmp_path):
    # zero learning rate: the one step changes nothing, so the saved model holds the step-0 weights
    cfg = TR.TrainConfig(**{**FAST, "warmup_steps": 0}, max_steps=1, lr=0.0, min_lr=0.0, seed=99,
                         init_from=str(source["model"]))
    TR.train(source["dir"] / "tok-a", tmp_path / "tuned", cfg)
    src, tuned = weights(source["model"]), weights(tmp_path / "tuned")
    assert src.keys() == tuned.keys()
    for name, w in src.items():
        assert (tuned[name] == w).all(), name
    # and not by accident: a fresh run with the same options but no init_from starts elsewhere
    fresh_cfg = TR.TrainConfig(**{**FAST, "warmup_steps": 0}, max_steps=1, lr=0.0, min_lr=0.0, seed=99)
    TR.train(source["dir"] / "tok-a", tmp_path / "fresh", fresh_cfg)
    fresh = weights(tmp_path / "fresh")
    assert any(not (fresh[n] == w).all() for n, w in src.items())


def test_data_in_another_vocabulary_is_refused_until_re_read_in_the_models(source, tmp_path):
    db = target_warehouse(tmp_path / "b.duckdb")
    T.tokenize(db, tmp_path / "tok-b")  # the target's own vocabulary: K359 is a token there, not in the model
    assert "DX//ICD10CM//K359" in T.Vocabulary.load(tmp_path / "tok-b" / "vocab.json").index
    cfg = TR.TrainConfig(**FAST, max_steps=1, init_from=str(source["model"]))
    with pytest.raises(TR.TrainingError, match=r"differs from the vocabulary of the model.*re-read the data with the "
                                               r"model's vocabulary"):
        TR.train(tmp_path / "tok-b", tmp_path / "refused", cfg)
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    # the command says so in one line on stderr, with a non-zero exit and no traceback
    proc = run_cli("train", "--data", str(tmp_path / "tok-b"), "--out", str(tmp_path / "refused-cli"), "--preset",
                   "tiny", "--max-steps", "1", "--init-from", str(source["model"]), "--json")
    assert proc.returncode != 0 and "re-read the data with the model's vocabulary" in proc.stderr
    assert "Traceback" not in proc.stderr

    # re-read in the model's vocabulary (`tokenize --vocabulary-from`): the unknown code becomes the model's RARE
    # diagnosis, and training starts
    summary = cli_json("tokenize", "--db", str(db), "--out", str(tmp_path / "tok-b-in-model"), "--vocabulary-from",
                       str(source["model"]), "--json")
    vocab = T.Vocabulary.load(tmp_path / "tok-b-in-model" / "vocab.json")
    assert vocab.tokens == T.Vocabulary.load(source["model"] / "vocab.json").tokens
    assert summary["db"] == str(db.resolve()) and sum(summary["subjects"].values()) == 60
    with warehouse.connect(db, read_only=True) as con:  # [END] is censored at the TARGET's extract end
        assert vocab.report["extract_end"] == warehouse.extract_end(con).isoformat()
    assert vocab.report["extract_end"] != T.Vocabulary.load(source["model"] / "vocab.json").report["extract_end"]
    done = TR.train(tmp_path / "tok-b-in-model", tmp_path / "tuned", cfg)
    assert done["status"] == "completed"


def test_init_from_with_another_preset_is_refused(source, tmp_path):
    cfg = TR.TrainConfig(**{**FAST, "preset": "small"}, max_steps=1, init_from=str(source["model"]))
    with pytest.raises(TR.TrainingError, match=r"a tiny model.*use --preset tiny"):
        TR.train(source["dir"] / "tok-a", tmp_path / "m", cfg)
