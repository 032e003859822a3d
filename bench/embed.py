"""Do patient embeddings carry meaning, and how fast and exact is the similar-patient index?

Three measurements, on a simulated cohort and a model trained on it (default: ``bench/quality.py``'s 10k-subject
cohort and its ``tiny`` ctx-256 model; both must exist: run ``python bench/quality.py`` first, or pass --model/--db):

1. **Linear probes** (scikit-learn ``LogisticRegressionCV`` on standardised features, L2 strength chosen by 5-fold
   CV AUROC on the train split, scored on tuning + held_out) for conditions *not yet coded at as_of* that get
   coded within ``--horizon-days`` (the simulator's chronic conditions: a subject with the code before as_of is
   left out of that probe), and for a future admission. Features: the embedding (last token, mean, both) vs
   counts of every code before as_of (log1p, the ``--top-codes`` most frequent) + age + sex. AUROC with
   patient-bootstrap 95% CIs and the paired difference (embedding "both" minus counts).
2. **kNN outcome prediction**: the admission-within-30-days rate among each test subject's ``--k`` nearest train
   subjects (the index ``foresight embed`` builds, cosine on centred vectors) vs the model's own risk (Monte Carlo
   futures, ``admission_30d``, ``--samples`` paths) on the same subjects.
3. **ANN vs exact** at ``--ann-n`` vectors of the model's width: recall@10 of usearch HNSW against exact search,
   build time and single-query latency (one thread), on (a) random Gaussian vectors and (b) real vectors: the
   cohort embedded at yearly as_of dates until ``--ann-n`` are collected (says how many it got).

    python bench/embed.py                              # ~10 minutes on 2 busy cores
    python bench/embed.py --max-test 500 --samples 4 --ann-n 20000    # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, str(REPO))

from foresight import warehouse  # noqa: E402
from foresight.embed import NeighbourIndex  # noqa: E402
from foresight.evaluate.metrics import bootstrap_ci, paired_difference, risk_metrics  # noqa: E402
from foresight.forecast import BUILTIN_TASKS, Forecaster, cohort_as_of, subsample  # noqa: E402

QUALITY = REPO / "bench" / "out" / "quality"
CONDITIONS = {  # simulator condition -> its ICD-10-CM code in MEDS
    "T2D": "DX//ICD10CM//E119", "CKD": "DX//ICD10CM//N189", "HF": "DX//ICD10CM//I509",
    "AF": "DX//ICD10CM//I4891", "DEPRESSION": "DX//ICD10CM//F329",
}


def cohort(con, as_of: datetime, max_train: int, max_test: int, seed: int) -> tuple[list[int], list[int]]:
    ids = cohort_as_of(con, as_of, active_days=None)
    split = dict(con.execute("SELECT subject_id, split FROM subject_splits").fetchall())
    train = subsample([s for s in ids if split.get(s) == "train"], max_train, seed)
    test = subsample([s for s in ids if split.get(s) in ("tuning", "held_out")], max_test, seed)
    return train, test


def embed_all(fc: Forecaster, con, ids: list[int], as_of: datetime, chunk: int = 1024):
    """(timelines, "both" vectors) of ``ids`` at ``as_of``, in ``ids`` order."""
    tls, vecs = [], []
    for lo in range(0, len(ids), chunk):
        part = fc.timelines_from_warehouse(con, ids[lo:lo + chunk], as_of)
        tls += part
        vecs.append(fc.embed(part, pooling="both"))
    order = {t.subject_id: i for i, t in enumerate(tls)}
    idx = [order[s] for s in ids]
    return [tls[i] for i in idx], np.concatenate(vecs)[idx]


def labels(con, ids: list[int], as_of: datetime, horizon_days: float) -> dict[str, np.ndarray]:
    """Per target: y (1/0) and, for conditions, NaN where the code was already there at as_of (not eligible)."""
    con.execute("CREATE OR REPLACE TEMP TABLE probe_ids AS SELECT unnest(?::BIGINT[]) AS subject_id", [ids])
    rows = con.execute(
        "SELECT e.subject_id, e.code, min(e.time) FROM events e JOIN probe_ids USING (subject_id) "
        "WHERE e.code IN (SELECT unnest($c::VARCHAR[])) GROUP BY 1, 2",
        {"c": list(CONDITIONS.values())}).fetchall()
    pos = {s: i for i, s in enumerate(ids)}
    end, month = as_of + timedelta(days=horizon_days), as_of + timedelta(days=30)
    out = {name: np.zeros(len(ids)) for name in [*CONDITIONS, "admission_1y", "admission_30d"]}
    for s, code, t in rows:
        for name, c in CONDITIONS.items():
            if code == c:
                out[name][pos[s]] = np.nan if t <= as_of else float(t <= end)
    adm = con.execute(
        "SELECT e.subject_id, min(e.time) FROM events e JOIN probe_ids USING (subject_id) "
        "WHERE e.code LIKE 'ADMIT//%' AND e.time > $t GROUP BY 1", {"t": as_of}).fetchall()
    for s, t in adm:
        out["admission_1y"][pos[s]] = float(t <= as_of + timedelta(days=365))
        out["admission_30d"][pos[s]] = float(t <= month)
    return out


def count_features(con, ids: list[int], as_of: datetime, top: int) -> np.ndarray:
    """log1p counts of the ``top`` most frequent codes before as_of, then age and sex (F=1)."""
    con.execute("CREATE OR REPLACE TEMP TABLE probe_ids AS SELECT unnest(?::BIGINT[]) AS subject_id", [ids])
    codes = [r[0] for r in con.execute(
        "SELECT code FROM events JOIN probe_ids USING (subject_id) WHERE time <= $t AND code <> 'MEDS_BIRTH' "
        "GROUP BY 1 ORDER BY count(*) DESC LIMIT $n", {"t": as_of, "n": top}).fetchall()]
    col = {c: j for j, c in enumerate(codes)}
    pos = {s: i for i, s in enumerate(ids)}
    x = np.zeros((len(ids), len(codes) + 2))
    for s, c, n in con.execute(
            "SELECT subject_id, code, count(*) FROM events JOIN probe_ids USING (subject_id) "
            "WHERE time <= $t GROUP BY 1, 2", {"t": as_of}).fetchall():
        if c in col:
            x[pos[s], col[c]] = math.log1p(n)
    for s, birth, female in con.execute(
            "SELECT subject_id, min(time) FILTER (WHERE code = 'MEDS_BIRTH'), bool_or(code = 'GENDER//F') "
            "FROM events JOIN probe_ids USING (subject_id) GROUP BY 1").fetchall():
        x[pos[s], -2] = (as_of - birth).days / 365.25 if birth else np.nan
        x[pos[s], -1] = float(bool(female))
    x[:, -2] = np.nan_to_num(x[:, -2], nan=float(np.nanmean(x[:, -2])))
    return x


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Standardise, then an L2 logistic regression whose strength is chosen by 5-fold CV AUROC on train: with a
    few dozen positives and hundreds of features a fixed C overfits one feature set and not the other."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # 1.10 API notices
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], cv=5, scoring="roc_auc",
                                                               max_iter=3000))
    return clf.fit(x_train, y_train).predict_proba(x_test)[:, 1]


def scored(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict:
    m = risk_metrics(y, p)
    ci = bootstrap_ci(y, p, groups, n_boot=200).get("auroc")
    return {"auroc": round(m["auroc"], 4), "ci": [round(c, 4) for c in ci] if ci else None}


def run_probes(feats: dict[str, tuple[np.ndarray, np.ndarray]], lab_tr: dict, lab_te: dict,
               test_ids: np.ndarray) -> list[dict]:
    rows = []
    for target in lab_tr:
        ok_tr, ok_te = ~np.isnan(lab_tr[target]), ~np.isnan(lab_te[target])
        ytr, yte = lab_tr[target][ok_tr], lab_te[target][ok_te]
        if ytr.sum() < 5 or yte.sum() < 5:
            continue
        preds = {name: probe(tr[ok_tr], ytr, te[ok_te]) for name, (tr, te) in feats.items()}
        row = {"target": target, "n_test": int(ok_te.sum()), "positives_test": int(yte.sum()),
               **{name: scored(yte, p, test_ids[ok_te]) for name, p in preds.items()}}
        d = paired_difference(yte, preds["embedding_both"], preds["counts"], test_ids[ok_te])
        row["both_minus_counts"] = {"auroc": round(d["auroc"], 4), "ci": [round(c, 4) for c in d["ci"]]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def knn_vs_model(fc, tls_te, v_tr, v_te, y_tr, y_te, test_ids, k: int, samples: int, seed: int) -> dict:
    index = NeighbourIndex.build(np.arange(len(v_tr)), v_tr, kind="exact")
    rows, _ = index.search(v_te, k)
    knn = y_tr[rows].mean(1)
    t0 = time.perf_counter()
    risk, _ = fc.task_risks(tls_te, BUILTIN_TASKS["admission_30d"], n=samples, seed=seed)
    model_s = time.perf_counter() - t0
    ok = np.isfinite(risk)
    out = {"target": "admission_30d", "n_test": int(ok.sum()), "positives_test": int(y_te[ok].sum()), "k": k,
           "samples": samples, "knn": scored(y_te[ok], knn[ok], test_ids[ok]),
           "model_risk": scored(y_te[ok], risk[ok], test_ids[ok]), "model_risk_seconds": round(model_s, 1)}
    d = paired_difference(y_te[ok], knn[ok], risk[ok], test_ids[ok])
    out["knn_minus_model"] = {"auroc": round(d["auroc"], 4), "ci": [round(c, 4) for c in d["ci"]]}
    return out


def ann_vs_exact(vectors: np.ndarray, queries: np.ndarray, what: str, k: int = 10) -> dict:
    """Recall@k of HNSW vs exact, build seconds and single-query latency (ms) of both, one thread."""
    t0 = time.perf_counter()
    exact = NeighbourIndex.build(np.arange(len(vectors)), vectors, kind="exact")
    exact_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    hnsw = NeighbourIndex.build(np.arange(len(vectors)), vectors, kind="usearch", threads=1)
    hnsw_build = time.perf_counter() - t0
    truth, _ = exact.search(queries, k)
    got, _ = hnsw.search(queries, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got, strict=True)]))

    def latency(index: NeighbourIndex, n: int) -> dict:
        ms = []
        for q in queries[:n]:
            t = time.perf_counter()
            index.search(q, k)
            ms.append((time.perf_counter() - t) * 1000)
        return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}

    return {"vectors": what, "n": len(vectors), "width": vectors.shape[1], "queries": len(queries),
            "recall_at_10": round(recall, 4), "exact_build_s": round(exact_build, 2),
            "hnsw_build_s": round(hnsw_build, 2), "exact": latency(exact, 200), "hnsw": latency(hnsw, len(queries))}


def real_vectors(fc, con, first: datetime, n: int, pooling_width: int) -> np.ndarray:
    """The whole cohort embedded ("last" pooling) at as_of = first, first - 1y, ... until ``n`` vectors."""
    parts, got, as_of = [], 0, first
    while got < n and as_of.year > 1990:
        ids = cohort_as_of(con, as_of, active_days=None)
        for lo in range(0, len(ids), 2048):
            tls = fc.timelines_from_warehouse(con, ids[lo:lo + 2048], as_of)
            parts.append(fc.embed(tls, pooling="last"))
            got += len(tls)
        print(f"real vectors: {got:,} (as_of {as_of.date()})", file=sys.stderr)
        as_of -= timedelta(days=365)
    return np.concatenate(parts)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=QUALITY / "runs" / "n10000-tiny-ctx256-tok3276800-seed0" / "model")
    ap.add_argument("--db", type=Path, default=QUALITY / "cohorts" / "n10000-s1" / "warehouse.duckdb")
    ap.add_argument("--as-of", default="2023-12-31")
    ap.add_argument("--horizon-days", type=float, default=730)
    ap.add_argument("--max-train", type=int, default=8000)
    ap.add_argument("--max-test", type=int, default=2000)
    ap.add_argument("--top-codes", type=int, default=300)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--model-risk-subjects", type=int, default=1000)
    ap.add_argument("--ann-n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="probes,knn,ann", help="Comma-separated: probes, knn, ann.")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "embed" / "results.json")
    args = ap.parse_args()
    import torch

    torch.manual_seed(args.seed)
    as_of = datetime.fromisoformat(args.as_of)
    parts = set(args.parts.split(","))
    fc = Forecaster.from_pretrained(args.model)
    width = int(fc.model.config.hidden_size)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                    "shared with other jobs", "command": " ".join(sys.argv), "model": str(args.model),
                    "db": str(args.db), "as_of": args.as_of, "horizon_days": args.horizon_days, "width": width}
    with warehouse.connect(args.db, read_only=True) as con:
        train, test = cohort(con, as_of, args.max_train, args.max_test, args.seed)
        t0 = time.perf_counter()
        _, v_tr = embed_all(fc, con, train, as_of)
        tls_te, v_te = embed_all(fc, con, test, as_of)
        result["embed_subjects_per_s"] = round((len(train) + len(test)) / (time.perf_counter() - t0), 1)
        lab_tr, lab_te = labels(con, train, as_of, args.horizon_days), labels(con, test, as_of, args.horizon_days)
        c_tr, c_te = (count_features(con, ids, as_of, args.top_codes) for ids in (train, test))
        feats = {"embedding_last": (v_tr[:, :width], v_te[:, :width]),
                 "embedding_mean": (v_tr[:, width:], v_te[:, width:]),
                 "embedding_both": (v_tr, v_te), "counts": (c_tr, c_te)}
        test_ids = np.array(test)
        result["train_subjects"], result["test_subjects"] = len(train), len(test)
        if "probes" in parts:
            result["probes"] = run_probes(feats, lab_tr, lab_te, test_ids)
        m = min(args.model_risk_subjects, len(test))
        if "knn" in parts:
            result["knn"] = knn_vs_model(fc, tls_te[:m], v_tr[:, :width], v_te[:m, :width], lab_tr["admission_30d"],
                                         lab_te["admission_30d"][:m], test_ids[:m], args.k, args.samples, args.seed)
            print(json.dumps(result["knn"]), file=sys.stderr)
        real = real_vectors(fc, con, as_of, args.ann_n + 1000, width) if "ann" in parts else None
    if real is not None:
        rng = np.random.default_rng(args.seed)
        gauss = rng.normal(size=(args.ann_n + 1000, width)).astype(np.float32)
        result["ann"] = [ann_vs_exact(gauss[:args.ann_n], gauss[args.ann_n:], "random Gaussian"),
                         ann_vs_exact(real[:-1000], real[-1000:], "real (cohort at yearly as_of dates)")]
        print(json.dumps(result["ann"]), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
