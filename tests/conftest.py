"""Shared fixtures. Real-data tests use ../shared/data (marked `shared_data`) and skip cleanly without it."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

# Offline, quiet, hermetic settings for every library the tests touch (set before they are imported).
_PREFECT_HOME = tempfile.mkdtemp(prefix="foresight-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEDCAT_DISABLE_VERSION_CHECK", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each gets one torch thread (and so do its child processes), or the
    # workers' OpenMP threads spin against each other (a tiny training step 40x slower on two shared cores)
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from foresight import sources, warehouse  # noqa: E402  (every import below runs after the settings above)
from foresight import tokens as T  # noqa: E402
from foresight.demo import demo_config  # noqa: E402
from foresight.forecast import Forecaster, Timeline  # noqa: E402
from foresight.simulate import simulate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FORESIGHT_SHARED_DATA", REPO.parent / "shared" / "data"))
MIMIC_DEMO = SHARED_DATA / "mimic-iv-demo-2.2"

requires_mimic = pytest.mark.skipif(
    not (MIMIC_DEMO / "hosp" / "patients.csv.gz").exists(),
    reason=f"MIMIC-IV demo not found at {MIMIC_DEMO} (../shared/data is absent)",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that read the shared data carry the `shared_data` marker, so `-m "not shared_data"` selects the rest.
    for item in items:
        if "mimic_demo" in getattr(item, "fixturenames", ()) or "demo_db" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(scope="session")
def mimic_demo() -> Path:
    if not (MIMIC_DEMO / "hosp" / "patients.csv.gz").exists():
        pytest.skip(f"MIMIC-IV demo not found at {MIMIC_DEMO} (../shared/data is absent)")
    return MIMIC_DEMO


@pytest.fixture(scope="session")
def demo_db(mimic_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warehouse with the MIMIC-IV demo loaded once for the whole session (tests must not modify it)."""
    db = tmp_path_factory.mktemp("demo") / "warehouse.duckdb"
    load_into("mimic-iv", mimic_demo, db)
    return db


CLI = [sys.executable, "-m", "foresight.cli"]


def load_into(kind: str, root: Path, db: Path, **options: Any) -> warehouse.LoadSummary:
    """Load one input into the warehouse file ``db`` through the one ETL driver (``foresight.sources.load``)."""
    with warehouse.connect(db) as con:
        return sources.load(kind, con, root, **options)


def rows(db: Path, query: str, params: Sequence[Any] | None = None) -> list[tuple]:
    """All rows of a query on a warehouse file, opened read-only."""
    with warehouse.connect(db, read_only=True) as con:
        return con.execute(query, params or []).fetchall()


def run_cli(*args: str, check: bool = False, timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess:
    """``foresight ARGS`` in a subprocess (the real console entry); ``check`` fails the test on a non-zero exit."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"foresight {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def cli_json(*args: str) -> dict[str, Any]:
    """``foresight ARGS --json``: the JSON object on the last line of stdout (the CLI contract)."""
    proc = run_cli(*args, "--json", check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- small warehouses and models the tests build (no shared data needed) ---------------------------------------


def simulated_warehouse(d: Path, n_subjects: int, seed: int) -> Path:
    """``n_subjects`` lives from the demo's simulator config, loaded through the MEDS source into ``d/w.duckdb``
    and tokenized into ``d/tok``; returns the warehouse path."""
    simulate(n_subjects, d / "sim", seed=seed, config=demo_config())
    with warehouse.connect(d / "w.duckdb") as con:
        sources.load("meds", con, d / "sim")
    T.tokenize(d / "w.duckdb", d / "tok")
    return d / "w.duckdb"


def tiny_warehouse(path: Path, n_subjects: int = 60, seed: int = 0) -> Path:
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
    with warehouse.connect(path) as con:
        con.executemany("INSERT INTO events VALUES (?, ?, ?, ?, NULL, NULL, NULL, 'test', 'test', 'test')", rows)
        con.execute("INSERT INTO subject_splits SELECT DISTINCT subject_id, fs_split(subject_id) FROM events")
        con.execute("INSERT INTO codes SELECT DISTINCT code, NULL, fs_kind(code), [], 'test' FROM events")
    return path


def tiny_llama(vocab: T.Vocabulary, *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Any:
    """An untrained Llama the size of a unit test over ``vocab`` (weights from ``torch.manual_seed(seed)``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab.tokens), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        pad_token_id=vocab.index["[PAD]"]))


def alive_timelines(fc: Forecaster, db: Path, n: int = 6) -> list[Timeline]:
    """Up to ``n`` timelines of living subjects of a warehouse, in subject order."""
    with warehouse.connect(db, read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT DISTINCT subject_id FROM events ORDER BY 1").fetchall()]
        tls = [fc.timeline_from_warehouse(con, s) for s in ids]
    return [t for t in tls if not t.dead][:n]


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server and database for the whole session (one per xdist worker), shared by every test
    that runs a flow: starting one costs 10-25 s of a busy CI core. Tests tell their runs apart by flow-run id."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread in a module that asks for it (``pytestmark = pytest.mark.usefixtures("one_thread")``) and
    in its child processes: CI's two cores are often shared, and spinning OpenMP threads then cost far more than
    they gain; it also gives every run, in-process or not, the same reduction order."""
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a (gzipped) CSV with Python's csv module: the independent reference for counts."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_csv_gz(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def tiny_mimic(tmp_path: Path) -> Path:
    """A hand-written MIMIC-IV folder: 3 patients, 4 admissions, diagnoses, labs; one bad row in each table.

    Subject 3 is 91 (top-coded age) and died in hospital; subject 1's admission 101 has a diagnosis list.
    """
    root = tmp_path / "mimic"
    write_csv_gz(root / "hosp" / "patients.csv.gz", ["subject_id", "gender", "anchor_age", "anchor_year", "dod"], [
        [1, "F", 50, 2150, ""],
        [2, "M", 30, 2160, ""],
        [3, "F", 91, 2170, "2171-03-04"],
        ["x7", "M", 40, 2150, ""],                     # non-integer subject id
    ])
    adm_header = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                  "admission_location", "discharge_location", "insurance", "language", "marital_status", "race",
                  "edregtime", "edouttime"]
    write_csv_gz(root / "hosp" / "admissions.csv.gz", adm_header, [
        [1, 101, "2150-05-01 10:00:00", "2150-05-06 12:00:00", "", "EW EMER.", "EMERGENCY ROOM", "HOME",
         "Medicare", "ENGLISH", "MARRIED", "WHITE", "2150-05-01 08:00:00", "2150-05-01 10:30:00"],
        [2, 201, "2160-01-10 09:00:00", "2160-01-12 09:00:00", "", "ELECTIVE", "PHYSICIAN REFERRAL", "HOME",
         "Other", "ENGLISH", "", "ASIAN", "", ""],
        [3, 301, "2171-03-01 00:00:00", "2171-03-04 06:00:00", "2171-03-04 06:00:00", "URGENT",
         "TRANSFER FROM HOSPITAL", "DIED", "Medicare", "", "WIDOWED", "WHITE", "", ""],
        [2, 202, "2160-02-10 09:00:00", "2160-02-01 09:00:00", "", "URGENT", "", "HOME", "", "", "", "",
         "", ""],                                     # discharged before admitted
    ])
    write_csv_gz(root / "hosp" / "diagnoses_icd.csv.gz", ["subject_id", "hadm_id", "seq_num", "icd_code",
                                                          "icd_version"], [
        [1, 101, 1, "E1165", 10],
        [1, 101, 2, "I10", 10],
        [3, 301, 1, "4019", 9],
        [2, 202, 1, "J189", 10],                      # its admission is quarantined: cannot be timed
        [9, 101, 1, "I10", 10],                       # unknown subject
    ])
    write_csv_gz(root / "hosp" / "d_icd_diagnoses.csv.gz", ["icd_code", "icd_version", "long_title"], [
        ["E1165", 10, "Type 2 diabetes mellitus with hyperglycemia"],
        ["E11", 10, "Type 2 diabetes mellitus"],
        ["I10", 10, "Essential (primary) hypertension"],
        ["4019", 9, "Unspecified essential hypertension"],
    ])
    write_csv_gz(root / "hosp" / "labevents.csv.gz", ["labevent_id", "subject_id", "hadm_id", "specimen_id",
                                                      "itemid", "charttime", "storetime", "value", "valuenum",
                                                      "valueuom"], [
        [1, 1, 101, 11, 50912, "2150-05-01 11:00:00", "2150-05-01 12:30:00", "1.1", "1.1", "mg/dL"],
        [2, 1, 101, 11, 50931, "2150-05-01 11:00:00", "", "NEG", "", ""],
        [3, 2, "", 12, 50912, "not a time", "", "0.9", "0.9", "mg/dL"],      # unparseable charttime
        [4, 2, "", 13, 50912, "1900-01-01 00:00:00", "", "0.9", "0.9", "mg/dL"],  # before birth
        [5, 1, 101, 14, 50912, "2150-05-02 11:00:00", "", "1e300", "1e300", "mg/dL"],  # absurd value
    ])
    return root
