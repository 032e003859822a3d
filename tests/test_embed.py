"""Patient embeddings and similar-patient search on a real (tiny, untrained) model: deterministic fixed-width
vectors, the opt-out honoured by `foresight embed`, exact and HNSW search agreeing, and /v1/similar releasing only
suppressed aggregates (subject ids to analyst keys only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from foresight import warehouse
from foresight.embed import NeighbourIndex, embed_warehouse
from foresight.forecast import Forecaster
from foresight.serve import ServeConfig, create_app, generate_key

from .conftest import alive_timelines
from .test_serve import auth, build_model_dir, sample_events

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args: str) -> tuple[int, dict | None, str]:
    """``foresight ARGS --json`` in this process (the model is already imported; a subprocess would spend most of
    this test starting torch): (exit code, the JSON line or None, stderr)."""
    from typer.testing import CliRunner

    from foresight.cli import app

    res = CliRunner().invoke(app, [*args, "--json"])
    lines = res.stdout.strip().splitlines()
    return res.exit_code, json.loads(lines[-1]) if res.exit_code == 0 else None, res.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("embed")
    model_dir, db = build_model_dir(root)
    fc = Forecaster.from_pretrained(model_dir)
    index = root / "index"
    with warehouse.connect(db, read_only=True) as con:
        meta = embed_warehouse(fc, con, index, model_dir=model_dir, chunk_subjects=16)
    keys = root / "keys.json"
    out = {"root": root, "model": model_dir, "db": db, "fc": fc, "index": index, "meta": meta, "keys": keys}
    for name, role, splits in (("researcher", "researcher", None), ("analyst", "analyst", None),
                               ("scoped", "analyst", ["train"])):
        out[name], _ = generate_key(keys, role, rate_per_minute=6000, burst=1000, splits=splits)
    return out


def test_embeddings_are_deterministic_and_the_same_width_for_any_history(built):
    fc = built["fc"]
    tls = alive_timelines(fc, built["db"], n=6)
    assert len({len(t.tokens) for t in tls}) > 1  # histories of different lengths
    first, again = fc.embed(tls), fc.embed(tls)
    assert first.shape == (len(tls), 32) and first.dtype == np.float32
    assert np.array_equal(first, again)  # eval mode, no sampling: bit-identical
    one_by_one = np.concatenate([fc.embed([t]) for t in tls])
    np.testing.assert_allclose(first, one_by_one, atol=1e-5)  # a batch's padding changes nothing
    both = fc.embed(tls, pooling="both")
    assert both.shape == (len(tls), 64)
    np.testing.assert_allclose(both[:, :32], first, atol=1e-5)
    np.testing.assert_allclose(both[:, 32:], fc.embed(tls, pooling="mean"), atol=1e-5)
    # a history far longer than the context is cut the way training cut it: same width, finite
    short = Forecaster(fc.model, fc.vocab, {"training": {"seq_len": 24}})
    long_tl = short.timeline_from_events(sample_events(n_admissions=40))
    assert len(long_tl.tokens) == 24
    assert short.embed([long_tl]).shape == (1, 32) and np.isfinite(short.embed([long_tl])).all()
    # posted events are embedded as their timeline
    np.testing.assert_allclose(fc.embed([sample_events()]), fc.embed([fc.timeline_from_events(sample_events())]))
    with pytest.raises(ValueError, match="pooling"):
        fc.embed(tls, pooling="max")


def test_exact_and_usearch_search_agree_on_a_small_case(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    ids = np.arange(1000, 1400)
    exact = NeighbourIndex.build(ids, vectors, kind="exact")
    hnsw = NeighbourIndex.build(ids, vectors, kind="usearch")
    assert NeighbourIndex.build(ids, vectors, exact_max=100).kind == "usearch"  # chosen by size
    queries = rng.normal(size=(25, 16)).astype(np.float32)
    e_ids, e_dist = exact.search(queries, 10)
    h_ids, h_dist = hnsw.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(e_ids, h_ids, strict=True)])
    assert recall >= 0.95
    np.testing.assert_allclose(np.sort(e_dist, 1)[:, 0], np.sort(h_dist, 1)[:, 0], atol=1e-4)
    assert (np.diff(e_dist, axis=1) >= -1e-6).all()  # nearest first
    # a stored vector's nearest neighbour is itself, at distance ~0, in both
    assert exact.search(vectors[7], 1)[0][0, 0] == hnsw.search(vectors[7], 1)[0][0, 0] == 1007
    for name, idx in (("e", exact), ("h", hnsw)):  # a saved index answers as the one in memory
        idx.save(tmp_path / name, {"pooling": "last"})
        again = NeighbourIndex.load(tmp_path / name)
        assert again.kind == idx.kind and again.meta["count"] == 400
        assert np.array_equal(again.search(queries, 10)[0], idx.search(queries, 10)[0])


def test_embed_cli_never_indexes_an_opted_out_subject(built, tmp_path):
    everyone = pq.read_table(built["index"] / "embeddings.parquet").column("subject_id").to_pylist()
    gone = everyone[3]
    opt_out = tmp_path / "optout.txt"
    opt_out.write_text(f"# opted out\n{gone}\n")
    out = tmp_path / "idx"
    code, res, _ = cli("embed", "--model", str(built["model"]), "--db", str(built["db"]), "--out", str(out),
                       "--exclude-subjects", str(opt_out), "--chunk-subjects", "10")
    assert code == 0 and res is not None
    assert res["count"] == len(everyone) - 1 and res["opt_out"]["honoured"] and res["kind"] == "exact"
    for name in ("embeddings.parquet", "futures.parquet"):
        assert gone not in pq.read_table(out / name).column("subject_id").to_pylist()
    assert gone not in np.load(out / "ids.npy").tolist()
    emb = pq.read_table(out / "embeddings.parquet")
    assert emb.num_rows == res["count"] and len(emb.column("vector")[0]) == res["width"] == 32
    assert emb.column("as_of")[0].as_py().isoformat() == res["as_of"]
    code, _, stderr = cli("similar", "--index", str(out), "--subject", str(gone))
    assert code == 2 and f"subject {gone} is not in the index" in stderr
    other = everyone[0]
    code, sim, _ = cli("similar", "--index", str(out), "--subject", str(other), "--k", "12")
    assert code == 0 and sim is not None
    listed = [n["subject_id"] for n in sim["neighbours"]]
    assert len(listed) == 12 and gone not in listed and other not in listed
    assert [n["distance"] for n in sim["neighbours"]] == sorted(n["distance"] for n in sim["neighbours"])
    assert all(isinstance(o["neighbours_with"], int) or o["neighbours_with"] == "<8"
               for o in sim["profile"]["outcomes"])


def _app(built: dict, audit: Path):
    from fastapi.testclient import TestClient

    cfg = ServeConfig(model_dir=built["model"], keys_file=built["keys"], audit_log=audit, db=built["db"],
                      similar_index=built["index"])
    return TestClient(create_app(cfg, forecaster=built["fc"]))


def test_similar_endpoint_suppresses_and_never_names_a_subject_to_a_researcher(built, tmp_path):
    from foresight.embed import SimilarIndex

    audit = tmp_path / "audit.jsonl"
    idx = SimilarIndex(built["index"])
    with _app(built, audit) as client:
        # every indexed subject is a neighbour: the tiny cohort's only subject with events in the horizon is among
        # them whatever the (random) model's embeddings, so some code is held by fewer than 8 neighbours
        body = {"events": sample_events(), "k": len(idx.split_of)}
        r = client.post("/v1/similar", json=body, headers=auth(built["researcher"]))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["neighbours"] is None and "subject_id" not in r.text
        # every count is suppressed (<8) or a multiple of 5; codes in fewer than 8 neighbours are not listed
        prof = out["profile"]
        cells = [prof["neighbours"], *[o["neighbours_with"] for o in prof["outcomes"]],
                 *[e["neighbours_with"] for e in prof["next_events"]]]
        assert all(c == "<8" or (isinstance(c, int) and c % 5 == 0 and c >= 5) for c in cells)
        # the same neighbours' raw counts: below the threshold -> "<8", and never listed as a code
        fc = built["fc"]
        found = idx.neighbours(fc.embed([sample_events()])[0], body["k"])
        raw = idx.profile_of([s for s, _ in found])
        for o in prof["outcomes"]:
            assert (o["neighbours_with"] == "<8") == (raw.outcomes[o["outcome"]] < 8)
        rare = {c for c, n in raw.codes if n < 8}
        assert rare and not rare & {e["code"] for e in prof["next_events"]}
        # an analyst gets the ids (the same neighbours); a train-scoped analyst only train subjects
        a = client.post("/v1/similar", json=body, headers=auth(built["analyst"])).json()
        assert [n["subject_id"] for n in a["neighbours"]] == [s for s, _ in found]
        s = client.post("/v1/similar", json=body, headers=auth(built["scoped"])).json()
        assert all(idx.split_of[n["subject_id"]] == "train" for n in s["neighbours"])
        assert len(s["neighbours"]) < body["k"] and any("outside this key's splits" in w for w in s["warnings"])
        # differencing: a neighbour set one subject smaller than a released one is refused
        r = client.post("/v1/similar", json={**body, "k": body["k"] - 1}, headers=auth(built["researcher"]))
        assert r.status_code == 403 and "differs from one already released" in r.json()["detail"]
        r = client.post("/v1/similar", json={**body, "k": 5}, headers=auth(built["researcher"]))
        assert r.status_code == 422
        assert client.post("/v1/similar", json=body).status_code == 401
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    similar = [x for x in records if x.get("endpoint") == "/v1/similar"]
    assert len(similar) == 6 and {x["status"] for x in similar} == {200, 403, 422, 401}


# --- cross-source evaluation: tokens of another source -----------------------------------------------------------


def test_evaluate_on_another_source_reports_the_lost_code_share(built, tmp_path):
    from foresight import tokens as T
    from foresight.evaluate import evaluate_model
    from foresight.tokens.folder import check_complete

    from .conftest import tiny_warehouse

    # the target source codes pneumonia one level deeper (J1890: the model knows only J189) and adds a SNOMED
    # finding the model never saw, once per subject each
    db = tiny_warehouse(tmp_path / "other.duckdb", n_subjects=40, seed=1)
    with warehouse.connect(db) as con:
        con.execute("INSERT INTO events SELECT e.subject_id, max(e.time) + INTERVAL 1 DAY, c.new_code, NULL, NULL, "
                    "NULL, NULL, 'test', 'test', 'test' FROM events e, (VALUES ('DX//ICD10CM//J1890'), "
                    "('DX//SNOMED//44054006')) c(new_code) WHERE e.subject_id NOT IN "
                    "(SELECT subject_id FROM events WHERE code = 'MEDS_DEATH') GROUP BY e.subject_id, c.new_code")
        con.execute("INSERT INTO codes SELECT DISTINCT code, NULL, fs_kind(code), [], 'test' FROM events "
                    "WHERE code NOT IN (SELECT code FROM codes)")
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    target = T.Vocabulary.load(tmp_path / "tok" / "vocab.json")
    model_vocab = built["fc"].vocab
    assert {"DX//ICD10CM//J1890", "DX//SNOMED//44054006"} <= set(target.tokens) and target.tokens != model_vocab.tokens
    held = np.fromfile(tmp_path / "tok" / "held_out.bin", dtype=target.dtype)
    events = int(target.is_event[held].sum())
    new = int(np.isin(held, [target.index["DX//ICD10CM//J1890"], target.index["DX//SNOMED//44054006"]]).sum())
    assert events and new
    report = evaluate_model(built["model"], tmp_path / "tok", tasks=[], admission_tasks=[], max_rows=4,
                            out_dir=tmp_path / "eval", calibration=None)
    assert report["lost_code_share"] == pytest.approx(new / events)  # exactly the two codes the model lacks
    cs = report["cross_source"]
    assert not cs["same_vocabulary"] and cs["codes_lost"] == 2 and cs["lost"] == new
    assert report["next_event"]["positions"] > 0  # scored on the tokens re-read in the model's vocabulary
    remapped = Path(cs["tokens"])
    check_complete(remapped)
    again = np.fromfile(remapped / "held_out.bin", dtype=model_vocab.dtype)
    assert len(again) == len(held)
    j = held == target.index["DX//ICD10CM//J1890"]
    assert (again[j] == model_vocab.index["DX//ICD10CM//J189"]).all()  # the nearest ancestor the model knows
    s = held == target.index["DX//SNOMED//44054006"]
    assert {model_vocab.tokens[i] for i in again[s]} <= {"DX//RARE", "RARE"}
    # the model's own tokens: nothing lost
    same = evaluate_model(built["model"], built["root"] / "tokens", tasks=[], admission_tasks=[], max_rows=2,
                          out_dir=tmp_path / "eval2", calibration=None)
    assert same["lost_code_share"] == 0.0 and same["cross_source"]["same_vocabulary"]
