"""The model and the DeepSpeed training loop on CPU: document masking, learning, exact resumption, checkpoints
that refuse to load damaged, divergence, two ranks, the saved directory, the CLI and the Prefect flow."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.train import train as train_flow
from foresight import model as M
from foresight import tokens as T
from foresight import train as TR
from foresight.censoring import GapBins
from foresight.dataset import IGNORE_INDEX, PackedSplit, RowStream
from foresight.hashing import sha256_file

from .conftest import CLI

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread, here and in child runs

REPO = Path(__file__).resolve().parents[1]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Small fp32 run used by the resume tests: every step is a few milliseconds.
RESUME = dict(preset="tiny", seq_len=64, micro_batch=4, max_steps=120, lr=3e-3, min_lr=3e-4, warmup_steps=5,
              eval_every=40, eval_rows=16, checkpoint_every=10, log_every=1000, seed=7)


def _clean_env() -> dict[str, str]:
    """The environment for a child run: none of the rank variables an in-process run left behind."""
    return {k: v for k, v in os.environ.items() if k not in RANK_VARS}


def _log(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / TR.LOG_FILE).read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def demo_data(demo_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    T.tokenize(demo_db, out, T.TokenizerConfig(min_subjects=5))
    return out


@pytest.fixture(scope="module")
def trained(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny model with the time head trained for one pass over the demo's train tokens (~300k)."""
    out = tmp_path_factory.mktemp("model")
    cfg = TR.TrainConfig(preset="tiny", seq_len=128, micro_batch=8, max_steps=300, lr=3e-3, min_lr=3e-4,
                         warmup_steps=5, eval_every=100, eval_rows=64, checkpoint_every=100, log_every=100,
                         time_head=True)
    return out, TR.train(demo_data, out, cfg)


# --- the model ----------------------------------------------------------------------------------------------


def test_preset_sizes(demo_data):
    vocab = T.Vocabulary.load(demo_data / "vocab.json")
    tiny = M.build_model("tiny", vocab)
    assert M.count_parameters(tiny) == M.preset_parameters("tiny", len(vocab.tokens)) < 1_000_000
    sizes = {name: M.preset_parameters(name, 10_000) for name in M.PRESETS}
    assert 8e6 < sizes["small"] < 12e6 and 90e6 < sizes["base"] < 110e6 and 230e6 < sizes["large"] < 270e6
    assert tiny.config.pad_token_id == vocab.index["[PAD]"] and tiny.config.bos_token_id == vocab.index["[BOS]"]
    assert tiny.config._attn_implementation == "sdpa"  # no GPU here: SDPA, never a hard flash-attn requirement
    with pytest.raises(KeyError, match="unknown preset"):
        M.build_config("huge", vocab)


def test_packed_subjects_cannot_see_each_other(demo_data):
    """Logits of a piece inside a packed row equal the logits of that piece run alone (document masking)."""
    ps = PackedSplit(demo_data, "train")
    plan = ps.plan(128, seed=3, epoch=0)
    model = M.build_model("tiny", ps.vocab, seed=1).eval()
    # a row that packs at least two subjects (most demo timelines fill whole rows on their own)
    r = next(r for r in range(plan.n_rows) if len(set(plan.subject[plan.row == r].tolist())) >= 2)
    row = ps.row(plan, r)
    ids = torch.from_numpy(row["input_ids"])[None]
    pos = torch.from_numpy(row["position_ids"])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        starts = [*np.flatnonzero(row["position_ids"] == 0).tolist(), len(ids[0])]
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
            assert torch.allclose(packed[a:b], alone, atol=1e-5), (a, b)
        # the control: without restarting positions the later pieces DO see earlier subjects
        leaky = model(input_ids=ids, position_ids=torch.arange(len(ids[0]))[None], use_cache=False).logits[0]
        a, b = starts[1], starts[2]
        assert not torch.allclose(leaky[a:b], model(input_ids=ids[:, a:b], use_cache=False).logits[0], atol=1e-3)


def test_row_stream_walks_the_epochs_and_splits_a_step_over_ranks(demo_data):
    ps = PackedSplit(demo_data, "train")
    stream = RowStream(ps, 64, seed=5)
    first = ps.plan(64, seed=5, epoch=0)
    assert stream.locate(first.n_rows - 1) == (0, first.n_rows - 1) and stream.locate(first.n_rows) == (1, 0)
    assert np.array_equal(stream.row(first.n_rows)["input_ids"],
                          ps.row(ps.plan(64, seed=5, epoch=1), 0)["input_ids"])
    # two ranks with two micro-steps each take the four consecutive micro-batches of the global batch in turn
    one = RowStream(ps, 64, seed=5).step_rows(3, micro_batch=2, grad_accum=4, rank=0, world_size=1)
    ranks = [RowStream(ps, 64, seed=5).step_rows(3, micro_batch=2, grad_accum=2, rank=r, world_size=2)
             for r in (0, 1)]
    interleaved = [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]]
    for a, b in zip(itertools.chain(*one), itertools.chain(*interleaved), strict=True):
        assert np.array_equal(a["input_ids"], b["input_ids"])


def test_time_to_next_days_marks_the_gaps(demo_data):
    ps = PackedSplit(demo_data, "train")
    plan = ps.plan(128, seed=0, epoch=0)
    time_ids = set(ps.vocab.time_ids.tolist())
    n_gaps = 0
    for r in range(60):
        row = ps.row(plan, r)
        dt = row["time_to_next_days"]
        assert dt.shape == (128,) and (dt >= 0).all()
        assert (dt[row["labels"] == IGNORE_INDEX] == 0).all()
        gap = dt > 0
        n_gaps += int(gap.sum())
        # a gap is always followed by an interval token, and every interval token that is a label and opens a
        # new timestamp (the previous input is not an interval token) carries a gap
        assert set(row["labels"][gap].tolist()) <= time_ids
        opens = np.isin(row["labels"], list(time_ids)) & ~np.isin(row["input_ids"], list(time_ids))
        assert (gap == opens).all()
    assert n_gaps > 100
    # the gap equals the token clock's step, in days
    opens_row = np.r_[True, plan.row[1:] != plan.row[:-1]]
    checked = 0
    for p in np.flatnonzero(opens_row & ~plan.continuation)[:20]:
        i, s = int(plan.subject[p]), int(plan.start[p])
        off = int(ps.index[i]["offset"])
        clock = np.asarray(ps.clock_min[off:s + int(plan.length[p])], dtype=np.int64)
        expect = np.diff(clock) / 1440.0
        got = ps.row(plan, int(plan.row[p]))["time_to_next_days"][:len(expect)]
        assert np.allclose(got, expect, atol=1e-6)
        checked += int((expect > 0).sum())
    assert checked > 10


def test_event_tokens_are_the_codes(demo_data):
    vocab = T.Vocabulary.load(demo_data / "vocab.json")
    is_event = dict(zip(vocab.tokens, vocab.is_event.tolist(), strict=True))
    for tok in ("[PAD]", "[BOS]", "[END]", "Q1", "Q10", "AGE//UNK", vocab.tokens[int(vocab.time_ids[0])]):
        assert not is_event[tok], tok
    assert not any(is_event[t] for t in vocab.tokens if t.startswith(("AGE//", "YEAR//", "BIRTH//", "GENDER//")))
    assert is_event["MEDS_DEATH"] and any(is_event[t] for t in vocab.tokens if t.startswith("DX//"))
    bias = M.event_log_bias(vocab)
    # an untrained model (logits 0) starts at one event per day
    rates = M.time_to_event(torch.zeros(len(vocab.tokens)), torch.from_numpy(bias), horizon_days=1.0)
    assert rates["rate"].item() == pytest.approx(1.0, rel=1e-5)
    assert rates["risk"].sum().item() == pytest.approx(1 - np.exp(-1.0), rel=1e-5)


# --- learning, saving, reloading ----------------------------------------------------------------------------


def test_tiny_model_learns_the_demo(trained, demo_data):
    out, summary = trained
    m = summary["metrics"]
    assert summary["status"] == "completed" and summary["step"] == 300
    # well below the entropy of the tuning tokens' own unigram distribution (the best context-free predictor)
    assert m["tuning_loss"] < 0.8 * m["unigram_entropy_tuning"], m
    # ... a bar an untrained model does not clear
    ps = PackedSplit(demo_data, "tuning")
    fresh = M.build_model("tiny", ps.vocab, seed=0)
    untrained = TR.estimate_loss(fresh, ps, 128, 1337, 64, 8, torch.device("cpu"))["loss"]
    assert untrained > m["unigram_entropy_tuning"]
    # the time head beats one constant rate for everybody
    assert m["tuning_time_loss"] < m["constant_rate_time_nll_tuning"] - 0.5, m
    evals = _log(out, "eval")
    assert [e["step"] for e in evals] == [100, 200, 300]
    assert evals[-1]["tuning_loss"] < evals[0]["tuning_loss"]


def test_saved_model_reloads_with_identical_logits(trained, demo_data):
    from transformers import AutoModelForCausalLM

    out, summary = trained
    card = json.loads((out / "foresight.json").read_text())
    vocab = T.Vocabulary.load(demo_data / "vocab.json")
    assert card["data"]["fingerprint"] == vocab.fingerprint and card["tokenizer"]["vocab"] == "vocab.json"
    assert (out / "vocab.json").read_text() == (demo_data / "vocab.json").read_text()
    assert card["time_head"]["enabled"] is True and card["training"]["preset"] == "tiny"
    assert card["metrics"]["tuning_loss"] == summary["metrics"]["tuning_loss"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    # the weights DeepSpeed holds in the final checkpoint give exactly the same logits
    ckpt = Path(summary["checkpoint"])
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    built = M.build_model("tiny", vocab).eval()
    built.load_state_dict(state)
    ps = PackedSplit(demo_data, "tuning")
    row = ps.row(ps.plan(128, seed=1337, epoch=0), 0)
    ids, pos = torch.from_numpy(row["input_ids"])[None], torch.from_numpy(row["position_ids"])[None]
    with torch.no_grad():
        a = reloaded(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = built(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert torch.equal(a, b)
    # and the reloaded model reproduces the reported tuning loss (the training objective: [END] censored)
    again = TR.estimate_loss(reloaded, ps, 128, 1337, 64, 8, torch.device("cpu"), gaps=GapBins.from_vocab(ps.vocab))
    assert again["loss"] == pytest.approx(summary["metrics"]["tuning_loss"], abs=1e-5)


# --- resumption, checkpoints, divergence --------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    TR.train(demo_data, out, TR.TrainConfig(**RESUME))
    return out


def test_stop_and_resume_gives_the_same_loss_curve(demo_data, straight, tmp_path):
    out = tmp_path / "m"
    first = TR.train(demo_data, out, TR.TrainConfig(**{**RESUME, "stop_at_step": 35}))
    assert first["status"] == "stopped" and first["step"] == 35
    assert not (out / "foresight.json").exists()
    with pytest.raises(TR.TrainingError, match="--resume"):  # never silently overwrite a run
        TR.train(demo_data, out, TR.TrainConfig(**RESUME))
    done = TR.train(demo_data, out, TR.TrainConfig(**RESUME), resume=True)
    assert done["status"] == "completed" and done["step"] == RESUME["max_steps"]
    a, b = _log(straight), _log(out)
    assert [r["step"] for r in b] == list(range(1, RESUME["max_steps"] + 1))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-6
    assert [e["tuning_loss"] for e in _log(straight, "eval")] == pytest.approx(
        [e["tuning_loss"] for e in _log(out, "eval")], abs=1e-6)
    with pytest.raises(TR.CheckpointError, match="seq_len"):  # a different run cannot resume this one
        TR.train(demo_data, out, TR.TrainConfig(**{**RESUME, "seq_len": 32}), resume=True)


def test_sigkilled_cli_run_resumes_to_the_same_loss_curve(demo_data, straight, tmp_path):
    out = tmp_path / "m"
    args = ["train", "--data", str(demo_data), "--out", str(out), "--config", str(tmp_path / "cfg.json")]
    (tmp_path / "cfg.json").write_text(json.dumps(RESUME))
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_env())
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: mid-step or mid-checkpoint
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = int(latest.read_text().split("_")[1])
    assert killed_at < RESUME["max_steps"] and not (out / "foresight.json").exists()

    res = subprocess.run([*CLI, *args, "--resume", "--json"], capture_output=True, text=True, env=_clean_env(),
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == RESUME["max_steps"]
    assert f"resumed from {out / 'checkpoints'}" in res.stderr
    a, b = _log(straight), _log(out)
    assert [r["step"] for r in b] == list(range(1, RESUME["max_steps"] + 1))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-6


def _checkpointed_run(demo_data: Path, out: Path) -> Path:
    TR.train(demo_data, out, TR.TrainConfig(**{**RESUME, "max_steps": 20, "stop_at_step": 10}))
    return TR.latest_checkpoint(out / "checkpoints")


def test_damaged_checkpoint_is_a_clear_error(demo_data, tmp_path):
    out = tmp_path / "m"
    ckpt = _checkpointed_run(demo_data, out)
    states = ckpt / "mp_rank_00_model_states.pt"
    good = states.read_bytes()
    cfg = TR.TrainConfig(**{**RESUME, "max_steps": 20})

    states.write_bytes(good[: len(good) // 2])  # truncated
    res = subprocess.run([*CLI, "train", "--data", str(demo_data), "--out", str(out), "--config",
                          str(_write(tmp_path / "cfg.json", {**RESUME, "max_steps": 20})), "--resume", "--json"],
                         capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert res.returncode == 4 and res.stdout.strip() == ""
    assert str(states) in res.stderr and "truncated" in res.stderr

    garbled = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 64):
        garbled[i] ^= 0xFF
    states.write_bytes(bytes(garbled))  # same size, different bytes
    with pytest.raises(TR.CheckpointError, match="sha256"):
        TR.train(demo_data, out, cfg, resume=True)

    # a file that is garbage but matches its manifest (e.g. written wrong): DeepSpeed's failure is named too
    states.write_bytes(b"not a checkpoint")
    manifest = json.loads((ckpt / TR.MANIFEST).read_text())
    manifest["files"][states.name] = {"bytes": states.stat().st_size, "sha256": sha256_file(states)}
    (ckpt / TR.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TR.CheckpointError, match=f"{ckpt}: DeepSpeed could not load it"):
        TR.train(demo_data, out, cfg, resume=True)

    (ckpt / TR.MANIFEST).unlink()  # interrupted while saving
    with pytest.raises(TR.CheckpointError, match="not completely written"):
        TR.train(demo_data, out, cfg, resume=True)


def _write(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo_data, tmp_path):
    out = tmp_path / "m"
    # a learning rate this absurd overflows the weights after the first update
    cfg = TR.TrainConfig(**{**RESUME, "lr": 1e30, "min_lr": 1e30, "warmup_steps": 0, "checkpoint_every": 1})
    with pytest.raises(TR.DivergedError) as info:
        TR.train(demo_data, out, cfg)
    latest = TR.latest_checkpoint(out / "checkpoints")
    step = int(latest.name.split("_")[1])
    assert f"at step {step + 1}" in str(info.value) and str(latest) in str(info.value)
    assert TR.verify_checkpoint(latest)["step"] == step
    assert not (out / "foresight.json").exists()
    assert all(np.isfinite(r["loss"]) for r in _log(out))


def test_lr_schedule_and_deepspeed_config(tmp_path):
    cfg = TR.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [TR.get_lr(i, cfg) for i in range(111)]
    assert lrs[0] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    for name in ("cpu", "single_gpu", "multi_gpu", "large"):
        path = REPO / "deploy" / "deepspeed" / f"{name}.json"
        ds = TR.deepspeed_config(cfg, path, on_gpu=True, world_size=8)
        assert ds["train_batch_size"] == cfg.micro_batch * cfg.grad_accum * 8
    large = TR.deepspeed_config(cfg, REPO / "deploy" / "deepspeed" / "large.json", on_gpu=True, world_size=8)
    assert large["zero_optimization"]["stage"] == 3 and large["optimizer"]["params"]["lr"] == 1.0
    bad = _write(tmp_path / "ds.json", {"train_micro_batch_size_per_gpu": 3})
    with pytest.raises(TR.TrainingError, match="train_micro_batch_size_per_gpu = 3 disagrees"):
        TR.deepspeed_config(cfg, bad, on_gpu=False, world_size=1)
    fp16 = _write(tmp_path / "fp16.json", {"fp16": {"enabled": True}})
    with pytest.raises(TR.TrainingError, match="fp16 is not supported on CPU"):
        TR.deepspeed_config(cfg, fp16, on_gpu=False, world_size=1)


def test_cli_train_help():
    proc = subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--deepspeed-config" in proc.stdout and "--resume" in proc.stdout


# --- two ranks and the Prefect flow -------------------------------------------------------------------------


def test_flow_in_process_and_two_ranks_agree(demo_data, tmp_path, prefect_server):
    """The flow trains in-process; with num_gpus=2 it launches two CPU ranks (ZeRO-2) through the DeepSpeed
    launcher, whose run equals one rank accumulating two micro-batches (the same global batch)."""
    opts = {k: v for k, v in RESUME.items() if k not in ("preset", "max_steps")}
    opts.update(eval_every=0, checkpoint_every=0)
    zero2 = _write(tmp_path / "zero2.json", {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}})
    one = train_flow(data=demo_data, out=tmp_path / "one", preset="tiny", max_steps=12,
                     options={**opts, "grad_accum": 2})
    two = train_flow(data=demo_data, out=tmp_path / "two", preset="tiny", max_steps=12, num_gpus=2,
                     deepspeed_config=zero2, options=opts)
    assert one["status"] == two["status"] == "completed"
    assert one["world_size"] == 1 and two["world_size"] == 2
    card = json.loads((tmp_path / "two" / "foresight.json").read_text())
    assert len(card["rank_weight_checksums"]) == 2 and len(set(card["rank_weight_checksums"])) == 1
    a, b = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert all(len(set(r["rank_losses"])) == 2 for r in b)  # each rank trained on its own rows
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) < 1e-4
