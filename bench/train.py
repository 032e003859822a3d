"""Training throughput: Foresight's DeepSpeed loop vs a plain Hugging Face ``Trainer`` on the same model and rows.

(a) ``foresight.train.train`` (DeepSpeed engine, fp32 ZeRO-0 on CPU / bf16 on GPU) and (b) ``transformers.Trainer``
(Foresight's original recipe: the HF training loop over a causal LM) train the SAME Llama preset, initialised from
the same seed, on the SAME packed rows (same micro-batch, sequence length, document masking through
``position_ids``, ``use_cache=False``), so the ratio measures the loops, not the data layout. Each measurement
runs in a fresh process (one framework's state never leaks into the other's), alternating (a), (b) for
``--repeats`` rounds; tokens/s is counted over the steps after ``--warmup`` (input positions per second, the same
count for both), and the median over rounds is reported with the ratio (a) / (b).

Data: ``--data DIR`` (from ``foresight tokenize``), or the MIMIC-IV demo (loaded and tokenized once under
bench/out/train-demo/), or ``--synthetic N`` subjects of random timelines with a 10k-token vocabulary (no input
data needed: what bench/gpu_train.sh uses on a GPU machine).

    python bench/train.py                                   # tiny model on the MIMIC demo, 3 rounds
    python bench/train.py --preset small --seq-len 256 --steps 40
    python bench/train.py --synthetic 4000 --preset base --seq-len 2048 --micro-batch 16 --only ours   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on sys.path, where bench/tokenize.py would shadow the standard library's
# tokenize module (imported deep inside torch/transformers): replace it with the repository root.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from foresight import model as M  # noqa: E402
from foresight import sources, warehouse  # noqa: E402
from foresight import tokens as T  # noqa: E402
from foresight import train as TR  # noqa: E402
from foresight.dataset import PackedSplit, RowStream  # noqa: E402

SHARED = Path(os.environ.get("FORESIGHT_SHARED_DATA", REPO.parent / "shared" / "data"))
OUT = REPO / "bench" / "out"


# --- data -----------------------------------------------------------------------------------------------


def demo_tokens() -> Path:
    """The MIMIC-IV demo, loaded into a warehouse and tokenized once (bench/out/train-demo/tokens)."""
    root = OUT / "train-demo"
    tokens = root / "tokens"
    if (tokens / "vocab.json").exists():
        return tokens
    root.mkdir(parents=True, exist_ok=True)
    db = root / "warehouse.duckdb"
    db.unlink(missing_ok=True)
    with warehouse.connect(db) as con:
        sources.load("mimic-iv", con, SHARED / "mimic-iv-demo-2.2")
    T.tokenize(db, tokens, T.TokenizerConfig(min_subjects=5))
    return tokens


def synthetic_tokens(out: Path, subjects: int, vocab_codes: int = 10_000, seed: int = 0) -> Path:
    """Random timelines in the on-disk token format (vocab.json + per-split .bin/.clock.bin/.index.npy).

    Shape only, no medicine: BOS, sex, birth band, YEAR, AGE, then timestamp groups (an interval token, 1-8 codes,
    some followed by a value token) and END. Timeline lengths are log-normal (median ~400 tokens, a long tail
    into the thousands, like hospital records), so packing and padding behave as on real data.
    """
    if (out / "vocab.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = T.TokenizerConfig(min_subjects=1, month_tokens=False)  # the synthetic layout below has no MONTH markers
    times = [t for t, _ in T.time_tokens(cfg)]
    years = range(2100, 2200)
    marker_map = {"AGE": {str(a): f"AGE//{a}" for a in range(0, 100)},
                  "YEAR": {str(y): f"YEAR//{y}" for y in years},
                  "BIRTH": {str(y): f"BIRTH//{y - y % 5}-{y - y % 5 + 4}" for y in range(2000, 2200)}}
    markers = [*sorted({t for m in marker_map.values() for t in m.values()}), "BIRTH//RARE", "YEAR//RARE",
               "AGE//RARE"]
    codes = [f"DX//SYN//{i:05d}" for i in range(vocab_codes)]
    tokens = [*T.SPECIAL_TOKENS, *times, *(f"Q{i}" for i in range(1, 11)), *markers, "GENDER//F", "GENDER//M",
              *codes]
    vocab = T.Vocabulary(cfg, tokens, {c: c for c in codes}, {c: [float(i) for i in range(9)] for c in codes[:2000]},
                         marker_map, {"synthetic": True}, fingerprint=f"synthetic-{subjects}-{seed}")
    vocab.save(out / "vocab.json")
    rng = np.random.default_rng(seed)
    ix = vocab.index
    code_ids = np.array([ix[c] for c in codes])
    zipf = 1.0 / np.arange(1, len(codes) + 1)  # a few codes are common, most are rare
    zipf /= zipf.sum()
    for split, share in (("train", 0.8), ("tuning", 0.1), ("held_out", 0.1)):
        n = max(1, int(subjects * share))
        toks, clocks, index = [], [], np.zeros(n, dtype=T.INDEX_DTYPE)
        offset = 0
        for s in range(n):
            birth_year = int(rng.integers(2010, 2090))
            t0_year = birth_year + int(rng.integers(18, 90)) if birth_year < 2100 else birth_year
            t0_year = min(t0_year, 2150)
            seq = [ix["[BOS]"], ix[f"GENDER//{'FM'[s % 2]}"], ix[marker_map["BIRTH"][str(birth_year)]],
                   ix[f"YEAR//{max(2100, t0_year)}"], ix[f"AGE//{min(99, t0_year - birth_year)}"]]
            clock = [0] * len(seq)
            now = 0
            target = int(np.clip(rng.lognormal(6.0, 1.0), 20, 20_000))
            first = True
            while len(seq) < target:
                if not first:
                    b = int(rng.integers(0, len(times)))
                    now += int(max(1, np.sqrt(cfg.time_bin_edges_minutes[max(b - 1, 0)]
                                              * cfg.time_bin_edges_minutes[b])))
                    seq.append(ix[times[b]])
                    clock.append(now)
                first = False
                for c in rng.choice(code_ids, size=int(rng.integers(1, 9)), p=zipf):
                    seq.append(int(c))
                    clock.append(now)
                    if vocab.has_quantiles[c]:
                        seq.append(int(vocab.q_ids[rng.integers(0, 10)]))
                        clock.append(now)
            seq.append(ix["[END]"])
            clock.append(now)
            index[s] = (s, offset, len(seq), 5, 3, (t0_year - 1970) * 31_557_600, (birth_year - 1970) * 31_557_600)
            toks.append(np.array(seq, dtype=vocab.dtype))
            clocks.append(np.array(clock, dtype=np.int32))
            offset += len(seq)
        np.concatenate(toks).tofile(out / f"{split}.bin")
        np.concatenate(clocks).tofile(out / f"{split}.clock.bin")
        np.save(out / f"{split}.index.npy", index)
    T.seal(out)  # the completion marker every reader of a token folder checks
    return out


# --- the two workers (each runs in its own process) -----------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """(a) foresight.train: the DeepSpeed loop, no evaluation or checkpoint until the end."""
    out = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    cfg = TR.TrainConfig(preset=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch,
                         max_steps=args.steps, warmup_steps=2, eval_every=0, eval_rows=args.micro_batch,
                         checkpoint_every=0, log_every=10**9, seed=1)
    summary = TR.train(args.data, out, cfg, deepspeed_config_path=args.deepspeed_config, log=lambda _m: None)
    recs = [r for r in map(json.loads, (out / TR.LOG_FILE).read_text().splitlines()) if r["kind"] == "train"]
    shutil.rmtree(out, ignore_errors=True)
    timed = recs[args.warmup:]
    tokens = len(timed) * args.micro_batch * args.seq_len
    m = summary["metrics"]
    return {"tokens_per_s": tokens / sum(r["seconds"] for r in timed),
            "tokens_per_cpu_s": tokens / sum(r["cpu_seconds"] for r in timed), "final_loss": recs[-1]["loss"],
            "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
            "padding_fraction": m["padding_fraction"], "parameters": summary["parameters"]}


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    """(b) transformers.Trainer over the same rows (labels given as ``shift_labels``: already shifted)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    split = PackedSplit(args.data, "train")
    stream = RowStream(split, args.seq_len, seed=1)
    model = M.build_model(args.preset, split.vocab, seed=1, max_positions=max(4096, args.seq_len))
    model.config.use_cache = False  # else a cache is built and the packed-sequence (document) mask is skipped

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return args.steps * args.micro_batch

        def __getitem__(self, g: int) -> dict[str, Any]:
            r = stream.row(g)
            lab = torch.from_numpy(r["labels"])
            return {"input_ids": torch.from_numpy(r["input_ids"]), "position_ids": torch.from_numpy(r["position_ids"]),
                    "labels": lab, "shift_labels": lab}

    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time) at each step end
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), time.process_time()))

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **_k: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    gpu = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"), per_device_train_batch_size=args.micro_batch,
        max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, use_cpu=not gpu, bf16=gpu,
        seed=1, data_seed=1)
    trainer = Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=[Clock()])
    trainer.train()
    shutil.rmtree(targs.output_dir, ignore_errors=True)
    t = stamps[args.warmup - 1:] if args.warmup > 0 else stamps  # from the end of the last warm-up step
    tokens = (len(t) - 1) * args.micro_batch * args.seq_len
    return {"tokens_per_s": tokens / (t[-1][0] - t[0][0]), "tokens_per_cpu_s": tokens / (t[-1][1] - t[0][1]),
            "final_loss": losses[-1] if losses else None}


# --- orchestration --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="token folder; default: the MIMIC-IV demo")
    ap.add_argument("--synthetic", type=int, default=0, help="use N synthetic subjects instead of real data")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deepspeed-config", type=Path)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default); 1 "
                    "makes tokens per CPU-second a clean measure of work on shared cores")
    ap.add_argument("--only", choices=["ours", "hf"], help="measure one side only")
    ap.add_argument("--results", action="store_true", help="append a dated section to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="a line for RESULTS.md (e.g. that the cores were shared)")
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # a child: measure once, print one JSON line
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = (run_ours if args.worker == "ours" else run_hf)(args)
        print("BENCH " + json.dumps(result), flush=True)
        return

    if args.data is None:
        args.data = synthetic_tokens(OUT / f"synthetic-{args.synthetic}", args.synthetic) if args.synthetic \
            else demo_tokens()
    sides = [args.only] if args.only else ["ours", "hf"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    for rnd in range(args.repeats):
        for side in sides:
            cmd = [sys.executable, __file__, "--worker", side, "--data", str(args.data), "--preset", args.preset,
                   "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            if args.deepspeed_config:
                cmd += ["--deepspeed-config", str(args.deepspeed_config)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            res = json.loads(line[6:])
            results[side].append(res)
            print(f"round {rnd + 1} {side:>4}: {res['tokens_per_s']:,.0f} tokens/s "
                  f"({res['tokens_per_cpu_s']:,.0f} per CPU-second), final loss "
                  f"{res['final_loss']:.4f}" + (f", MFU {res['mfu']:.1%}" if res.get("mfu") else ""), flush=True)

    med = {s: statistics.median(r["tokens_per_s"] for r in results[s]) for s in sides}
    med_cpu = {s: statistics.median(r["tokens_per_cpu_s"] for r in results[s]) for s in sides}
    ours = results.get("ours", [{}])[0]
    summary = {"preset": args.preset, "parameters": ours.get("parameters"), "seq_len": args.seq_len,
               "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
               "repeats": args.repeats, "median_tokens_per_s": {s: round(v, 1) for s, v in med.items()},
               "median_tokens_per_cpu_s": {s: round(v, 1) for s, v in med_cpu.items()},
               "padding_fraction": ours.get("padding_fraction"),
               "mfu": statistics.median(r["mfu"] for r in results["ours"]) if ours.get("mfu") else None}
    if len(sides) == 2:
        summary["ratio_ours_over_hf"] = round(med["ours"] / med["hf"], 3)
        summary["cpu_ratio_ours_over_hf"] = round(med_cpu["ours"] / med_cpu["hf"], 3)
    print(json.dumps(summary))
    if args.results:
        append_results(args, summary, results)


def append_results(args: argparse.Namespace, summary: dict[str, Any], results: dict[str, list]) -> None:
    """Append a dated section to bench/RESULTS.md (re-read right before writing: others append too)."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    data = "synthetic" if args.synthetic else ("MIMIC-IV demo" if "train-demo" in str(args.data) else args.data)
    lines = [
        f"\n## {date.today().isoformat()} — training throughput: DeepSpeed loop vs HF Trainer (bench/train.py)\n",
        f"Machine: {platform.node()} ({device}), torch {torch.__version__}. {args.note}".rstrip() + "\n",
        f"Command: `python bench/train.py --preset {args.preset} --seq-len {args.seq_len} --micro-batch "
        f"{args.micro_batch} --steps {args.steps} --warmup {args.warmup} --repeats {args.repeats} --threads "
        f"{args.threads}`; data: {data}; "
        f"{summary['parameters']:,} parameters; same model init, same packed rows, fp32 on CPU.\n",
        "| loop | wall tokens/s per round | median | tokens per CPU-second per round | median |\n"
        "|---|---|---|---|---|\n",
    ]
    for side, label in (("ours", "foresight.train (DeepSpeed)"), ("hf", "transformers.Trainer")):
        if side in results:
            per = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in results[side])
            per_cpu = ", ".join(f"{r['tokens_per_cpu_s']:,.0f}" for r in results[side])
            lines.append(f"| {label} | {per} | {summary['median_tokens_per_s'][side]:,.0f} | {per_cpu} | "
                         f"{summary['median_tokens_per_cpu_s'][side]:,.0f} |\n")
    if "ratio_ours_over_hf" in summary:
        lines.append(f"\nRatio ours / HF Trainer (medians): wall **{summary['ratio_ours_over_hf']:.2f}**, per "
                     f"CPU-second **{summary['cpu_ratio_ours_over_hf']:.2f}**. Padding waste of the packed rows: "
                     f"{summary['padding_fraction']:.2%}.\n")
    path = REPO / "bench" / "RESULTS.md"
    existing = path.read_text() if path.exists() else "# Benchmark results\n"
    path.write_text(existing.rstrip("\n") + "\n" + "".join(lines))


if __name__ == "__main__":
    main()
