"""The built-in simulator: determinism, output formats, event rates vs the configured hazards, and the oracle.

Statistical tests use fixed seeds (so they are deterministic) and a stated tolerance: an observed count must be
within 4 standard errors of what the hazards predict. Under a correct simulator each check fails with probability
~6e-5 for an arbitrary seed; a wrong rate, a wrong state rebuild or a wrong posterior moves them by many SE.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from scipy.stats import chi2

from foresight import schema, sources, warehouse
from foresight.simulate import Oracle, default_config, simulate
from foresight.simulate import catalog as cat
from foresight.simulate.history import read_history
from foresight.simulate.model import AGE_KNOTS, OMEGA, YEAR, Model
from foresight.simulate.writers import SYNTHEA_HEADERS

TOL_SE = 4.0  # tolerance of every count check, in standard errors
CAL_P = 1e-4  # decile calibration: chi-square (10 df) must stay below its 1 - CAL_P quantile
N_COHORT = 20_000


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 simulated subjects (MEDS), shared by the statistical tests."""
    out = tmp_path_factory.mktemp("sim") / "cohort"
    simulate(N_COHORT, out, seed=3, chunk_size=10_000)
    return out


@pytest.fixture(scope="module")
def events(cohort: Path) -> pa.Table:
    return ds.dataset(cohort / "data").to_table()


@pytest.fixture(scope="module")
def oracle(cohort: Path) -> Oracle:
    return Oracle.from_dir(cohort)


@pytest.fixture(scope="module")
def history(cohort: Path, oracle: Oracle):
    return read_history(cohort, oracle.model)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 subjects in three chunks, in both formats with notes (round trips, layout)."""
    out = tmp_path_factory.mktemp("sim") / "small"
    simulate(1_500, out, seed=5, formats=("meds", "synthea"), notes=True, chunk_size=500)
    return out


def _times(tab: pa.Table) -> np.ndarray:
    return tab["time"].to_numpy(zero_copy_only=False).astype("datetime64[us]")


def _first_after(tab: pa.Table, codes: list[str], subjects: np.ndarray, t0: np.ndarray, days: float) -> np.ndarray:
    """For each (subject, t0): did an event with one of ``codes`` happen in (t0, t0 + days]?"""
    sel = tab.filter(pc.is_in(tab["code"], pa.array(codes)))
    sid = sel["subject_id"].to_numpy()
    t = _times(sel)
    order = np.lexsort((t, sid))
    sid, t = sid[order], t[order]
    t0 = np.asarray(t0, dtype="datetime64[us]")
    t1 = t0 + np.timedelta64(round(days * 86_400_000_000), "us")
    # The first event after t0 for the subject: search within the subject's sorted events.
    lo = np.searchsorted(sid, subjects, side="left")
    hi = np.searchsorted(sid, subjects, side="right")
    out = np.zeros(subjects.size, bool)
    for i in np.flatnonzero(hi > lo):
        k = lo[i] + np.searchsorted(t[lo[i]:hi[i]], t0[i], side="right")
        out[i] = k < hi[i] and t[k] <= t1[i]
    return out


def _check_risk(p: np.ndarray, se: np.ndarray, y: np.ndarray, what: str) -> None:
    """Observed count within TOL_SE of the oracle's expectation, and calibrated by decile."""
    ok = ~np.isnan(p)
    assert ok.sum() >= 100, f"{what}: only {ok.sum()} scored pairs"  # a check on no pairs would pass vacuously
    p, se, y = p[ok], se[ok], y[ok]
    var = float((p * (1 - p)).sum() + (se**2).sum())
    z = (y.sum() - p.sum()) / math.sqrt(var)
    assert abs(z) < TOL_SE, f"{what}: observed {y.sum()} vs oracle {p.sum():.1f} (z = {z:.2f})"
    edges = np.quantile(p, np.linspace(0, 1, 11))
    b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    stat = sum((y[b == i].sum() - p[b == i].sum()) ** 2 / max((p[b == i] * (1 - p[b == i])).sum()
                                                                + (se[b == i] ** 2).sum(), 1e-9) for i in range(10))
    assert stat < chi2.ppf(1 - CAL_P, 10), f"{what}: decile calibration chi-square {stat:.1f}"


# --- determinism and formats ------------------------------------------------------------------------------


def test_same_seed_gives_identical_output_whatever_the_workers(tmp_path):
    a = simulate(700, tmp_path / "a", seed=9, formats=("meds", "synthea"), notes=True, chunk_size=250)
    b = simulate(700, tmp_path / "b", seed=9, formats=("meds", "synthea"), notes=True, chunk_size=250, workers=2)
    assert a["events"] == b["events"] > 700 * 20
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # The configuration written next to the data re-simulates exactly the same data.
    config = json.loads((tmp_path / "a" / "metadata" / "simulator.json").read_text())["config"]
    simulate(700, tmp_path / "c", seed=9, chunk_size=250, config=config)
    assert _digest(tmp_path / "a" / "data") == _digest(tmp_path / "c" / "data")
    simulate(700, tmp_path / "d", seed=10, chunk_size=250)
    assert _digest(tmp_path / "a" / "data") != _digest(tmp_path / "d" / "data")


def test_meds_layout_matches_the_project_contract(small):
    shards = sorted((small / "data").glob("*.parquet"))
    assert [p.name for p in shards] == ["0.parquet", "1.parquet", "2.parquet"]
    seen: set[int] = set()
    for shard in shards:
        t = pq.read_table(shard)
        assert t.schema.remove(t.schema.get_field_index("unit")).equals(schema.meds_data_schema())
        assert t.schema.field("unit").type == pa.string()
        ids = t["subject_id"].to_numpy()
        assert not set(ids.tolist()) & seen  # a subject lives in exactly one shard
        seen |= set(ids.tolist())
        time = t["time"].to_numpy(zero_copy_only=False).astype("datetime64[us]").astype(np.int64)
        static = t["time"].is_null().to_numpy(zero_copy_only=False)
        key = np.where(static, np.iinfo(np.int64).min, time)
        order = np.lexsort((key, ids))
        assert (order == np.arange(ids.size)).all()  # by subject, static first, then time
        codes = t["code"].to_pylist()
        assert {schema.code_kind(c) for c in codes} <= set(schema.KINDS)
        lab = pc.starts_with(t["code"], "LAB//")
        assert pc.all(pc.is_valid(t.filter(lab)["numeric_value"])).as_py()
        assert pc.all(pc.is_valid(t.filter(lab)["unit"])).as_py()
        # Static facts have no time; every subject has exactly one birth.
        assert set(t.filter(t["time"].is_null())["code"].to_pylist()) <= {
            "GENDER//F", "GENDER//M", *(f"RACE//{r}" for r in cat.RACES), "ETHNICITY//HISPANIC",
            "ETHNICITY//NOT_HISPANIC"}
        births = t.filter(pc.equal(t["code"], "MEDS_BIRTH"))["subject_id"].to_numpy()
        assert np.array_equal(np.sort(births), np.unique(ids))
    assert len(seen) == 1_500
    codes = pq.read_table(small / "metadata" / "codes.parquet")
    assert codes.schema.equals(schema.meds_codes_schema())
    described = dict(zip(codes["code"].to_pylist(), codes["description"].to_pylist(), strict=True))
    parents = dict(zip(codes["code"].to_pylist(), codes["parent_codes"].to_pylist(), strict=True))
    assert described["DX//ICD10CM//E119"] == "Type 2 diabetes mellitus without complications"
    assert parents["DX//ICD10CM//E119"] == ["DX//ICD10CM//E11"] and described["DX//ICD10CM//E11"]
    assert parents["RX//ATC//A10BA02"][0] == "RX//ATC//A10BA"
    used = set(ds.dataset(small / "data").to_table(columns=["code"])["code"].unique().to_pylist())
    assert used <= set(described)
    assert all(p in described for ps in parents.values() for p in ps)
    splits = pq.read_table(small / "metadata" / "subject_splits.parquet").to_pylist()
    assert all(s["split"] == schema.split_of(s["subject_id"]) for s in splits) and len(splits) == 1_500
    meta = json.loads((small / "metadata" / "dataset.json").read_text())
    assert meta["meds_version"] == schema.MEDS_VERSION
    assert Oracle.from_dir(small).model.names == Model.from_config().names


def test_synthea_layout_uses_the_real_synthea_columns(small):
    csv_dir = small / "csv"
    real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthea-ca-59pt" / "csv"
    for name, header in SYNTHEA_HEADERS.items():
        ours = (csv_dir / f"{name}.csv").read_text().splitlines()[0].split(",")
        assert ours == header
        if (real / f"{name}.csv").exists():  # the real export, when ../shared/data is there
            assert ours == (real / f"{name}.csv").read_text().splitlines()[0].split(",")
    patients = (csv_dir / "patients.csv").read_text().splitlines()
    assert len(patients) == 1 + 1_500
    enc = pa.csv.read_csv(csv_dir / "encounters.csv")
    assert set(enc["ENCOUNTERCLASS"].to_pylist()) == {"wellness", "ambulatory", "inpatient"}
    cond = pa.csv.read_csv(csv_dir / "conditions.csv", convert_options=pa.csv.ConvertOptions(
        column_types={"CODE": pa.string()}))
    assert "44054006" in cond["CODE"].to_pylist() or "59621000" in cond["CODE"].to_pylist()  # SNOMED


def test_notes_mention_conditions_negations_and_family_history(small):
    notes = pa.csv.read_csv(small / "notes.csv")
    text = notes["text"].to_pylist()
    assert notes.num_rows > 1_500 and set(notes["subject_id"].to_pylist()) <= set(range(1, 1_501))
    joined = "\n".join(text)
    for phrase in ("No evidence of", "Discharge summary", "Mother had breast cancer", "hypertension"):
        assert phrase in joined
    for t in text:  # a negated condition is never one the note lists as present
        for term in ("heart failure", "atrial fibrillation", "dementia"):
            assert not (f"No evidence of {term}" in t and (f"Known {term}" in t or f"of {term};" in t))


def test_cli_simulate_json_contract(tmp_path):
    cli = [sys.executable, "-m", "foresight.cli", "simulate"]
    helped = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "Usage" in helped.stdout and "--subjects" in helped.stdout
    proc = subprocess.run([*cli, "--subjects", "200", "--out", str(tmp_path / "s"), "--seed", "4", "--format",
                           "meds", "--format", "synthea", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["subjects"] == 200 and payload["events"] == payload["rows"]["meds"]["data"]
    assert payload["rows"]["synthea"]["patients"] == 200
    assert (tmp_path / "s" / "csv" / "encounters.csv").exists() and (tmp_path / "s" / "data" / "0.parquet").exists()
    bad = subprocess.run([*cli, "--subjects", "5", "--out", str(tmp_path / "x"), "--format", "xml"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown --format xml" in bad.stderr


def test_a_bad_configuration_is_a_clear_error():
    cfg = default_config()
    cfg["processes"]["ONSET_T2D"]["hr"]["OBESTY"] = 2.0
    with pytest.raises(ValueError, match="ONSET_T2D: unknown name 'OBESTY'"):
        Model.from_config(cfg)
    cfg = default_config()
    cfg["processes"]["DEATH"]["per_1000py"] = [1.0, 2.0]
    with pytest.raises(ValueError, match="DEATH: per_1000py needs 11"):
        Model.from_config(cfg)


# --- rates against the hazards ----------------------------------------------------------------------------


@pytest.mark.parametrize("event,codes", [
    ("admission", ["ADMIT//EMERGENCY", "ADMIT//ELECTIVE"]),
    ("emergency_admission", ["ADMIT//EMERGENCY"]),
])
def test_admissions_per_age_band_match_the_hazards(cohort, events, oracle, history, event, codes):
    """Observed admissions per age band vs the hazards integrated over each subject's recorded person-time.

    From 2000-01-01 (the cohort is everyone alive then or born later, so person-time from then on is not
    survivor-selected). observed - expected is a martingale with variance ~ expected: |z| < 4 per band.
    """
    comp = oracle.compensator(history, "2000-01-01", "2026-01-01", event)
    births = events.filter(pc.equal(events["code"], "MEDS_BIRTH"))
    birth_of = dict(zip(births["subject_id"].to_pylist(), _times(births), strict=True))
    adm = events.filter(pc.is_in(events["code"], pa.array(codes)))
    t = _times(adm)
    keep = t >= np.datetime64("2000-01-01")
    sid = adm["subject_id"].to_numpy()[keep]
    age = (t[keep] - np.array([birth_of[s] for s in sid])).astype("timedelta64[s]").astype(float) / 86400 / YEAR
    bands = [0, 18, 45, 65, 75, 85, 200]
    observed = np.histogram(age, bands)[0]
    expected = np.histogram(comp["age"], bands, weights=comp["expected"])[0]
    assert observed.sum() > 10_000
    for lo, hi, o, e in zip(bands[:-1], bands[1:], observed, expected, strict=True):
        z = (o - e) / math.sqrt(e)
        assert abs(z) < TOL_SE, f"{event} at ages {lo}-{hi}: observed {o}, hazards give {e:.1f} (z = {z:.2f})"
    # Realistic shape: far more admissions at 65-75 than at 18-45, despite far fewer people.
    assert observed[3] > 2 * observed[1]


def test_out_of_hospital_deaths_match_the_hazard(events, oracle, history):
    comp = oracle.compensator(history, "2000-01-01", "2026-01-01", "death")
    deaths = events.filter(pc.equal(events["code"], "MEDS_DEATH"))
    in_hospital = events.filter(pc.equal(events["code"], "DISCHARGE//DIED"))
    key = lambda tab: set(zip(tab["subject_id"].to_pylist(), _times(tab).tolist(), strict=True))  # noqa: E731
    t = _times(deaths)
    outside = key(deaths.filter(pa.array(t >= np.datetime64("2000-01-01")))) - key(in_hospital)
    e = comp["expected"].sum()
    assert abs(len(outside) - e) < TOL_SE * math.sqrt(e), (len(outside), e)


def test_winter_peak_in_emergency_admissions(events):
    adm = events.filter(pc.equal(events["code"], "ADMIT//EMERGENCY"))
    t = _times(adm)
    month = (t.astype("datetime64[M]").astype(np.int64) % 12) + 1
    winter = np.isin(month, (12, 1, 2)).sum()
    summer = np.isin(month, (6, 7, 8)).sum()
    assert winter > 1.2 * summer, (winter, summer)


def test_oracle_matches_an_independent_calculation_for_a_simple_history(oracle):
    """A healthy 40-year-old woman: P(admission within 30 days) = 1 - exp(-integral of the admission hazards).

    Computed here from the configuration alone (log-linear age interpolation, seasonal factor on a fine grid),
    for her state as it is. Her state can change within the month by a new onset (P ~ 0.3%, raising her hazards
    by up to ~30%), which the oracle includes: allowed for by 1% plus 4 of the oracle's stated standard errors.
    """
    cfg = default_config()
    birth = np.datetime64("1984-03-10")
    as_of = np.datetime64("2024-11-20")
    hist = {"subject_id": [7, 7, 7, 7], "time": [None, None, None, birth.astype("datetime64[us]")],
            "code": ["GENDER//F", "RACE//WHITE", "ETHNICITY//NOT_HISPANIC", "MEDS_BIRTH"],
            "numeric_value": [None] * 4}
    hist = pa.table({"subject_id": pa.array(hist["subject_id"], pa.int64()),
                     "time": pa.array(hist["time"], pa.timestamp("us")), "code": hist["code"],
                     "numeric_value": pa.array(hist["numeric_value"], pa.float32())})
    risk = oracle.true_risk(hist, as_of, 30, "admission", samples=400)
    age = 40 + 0.5  # base rates are taken at the middle of each year of age
    days = np.arange(0.0, 30.0, 1.0 / 96) + 1.0 / 192
    t = (as_of - np.datetime64("1970-01-01")).astype(float) + days
    total = 0.0
    for p in cfg["processes"].values():
        if p["kind"] != "admission" or p["requires"]:
            continue
        rate = math.exp(np.interp(age, AGE_KNOTS, np.log(np.maximum(p["per_1000py"], 1e-9))))
        amp, peak = p["season"]
        season = 1 + amp * np.cos(OMEGA * t - 2 * math.pi * peak)
        total += rate / 1000 / YEAR * season.sum() / 96
    expected = 1 - math.exp(-total)
    assert expected > 0.001  # she is at some risk: the tolerance below is relative to it
    assert abs(risk.probability[0] - expected) < 0.01 * expected + TOL_SE * risk.stderr[0]
    assert risk.stderr[0] < 0.01 * expected


# --- the oracle against what happened ---------------------------------------------------------------------


@pytest.mark.parametrize("event,days,codes", [
    ("admission", 90, ["ADMIT//EMERGENCY", "ADMIT//ELECTIVE"]),
    ("emergency_admission", 180, ["ADMIT//EMERGENCY"]),
    ("death", 365, ["MEDS_DEATH"]),
    ("icu_admission", 365, ["ICU//ADMIT"]),
])
def test_oracle_agrees_with_simulated_futures(events, oracle, history, event, days, codes):
    as_of = np.datetime64("2024-06-01")
    risk = oracle.true_risk(history, as_of, days, event, samples=16, seed=1)
    y = _first_after(events, codes, risk.subject_id, np.full(risk.subject_id.size, as_of), days)
    dead_or_unborn = np.isnan(risk.probability)
    assert 0.15 < dead_or_unborn.mean() < 0.35  # subjects dead or unborn at as_of get NaN
    _check_risk(risk.probability, risk.stderr, y, f"{event} within {days} days of {as_of}")


def _admissions(events: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    adm = events.filter(pc.starts_with(events["code"], "ADMIT//"))
    t = _times(adm)
    keep = (t >= np.datetime64("2012-01-01")) & (t < np.datetime64("2025-11-01"))
    return adm["subject_id"].to_numpy()[keep], t[keep]


@pytest.mark.parametrize("hours", [0.5, 3.0])
def test_oracle_inside_a_stay_uses_the_posterior_of_its_course(events, oracle, history, hours):
    """As of 30 min (nothing seen yet) or 3 h (labs and any ICU transfer seen) into each admission."""
    sid, t = _admissions(events)
    assert sid.size > 1_000
    as_of = t + np.timedelta64(int(hours * 3600), "s")
    for event, codes in (("death", ["MEDS_DEATH"]), ("icu_admission", ["ICU//ADMIT"])):
        risk = oracle.true_risk(history, as_of, 30, event, subjects=sid, samples=16, seed=2)
        assert not np.isnan(risk.probability).any()
        y = _first_after(events, codes, sid, as_of, 30)
        _check_risk(risk.probability, risk.stderr, y, f"{event} within 30 days, {hours} h into a stay")


def test_oracle_readmission_after_discharge(events, oracle, history):
    dis = events.filter(pc.starts_with(events["code"], "DISCHARGE//"))
    dis = dis.filter(pc.not_equal(dis["code"], "DISCHARGE//DIED"))
    t = _times(dis)
    keep = (t >= np.datetime64("2012-01-01")) & (t < np.datetime64("2025-11-01"))
    sid, t = dis["subject_id"].to_numpy()[keep], t[keep]
    risk = oracle.true_risk(history, t, None, "readmission_30d", subjects=sid, samples=16, seed=3)
    assert risk.horizon_days == 30
    y = _first_after(events, ["ADMIT//EMERGENCY", "ADMIT//ELECTIVE"], sid, t, 30)
    _check_risk(risk.probability, risk.stderr, y, "readmission within 30 days of discharge")
    # A discharge raises the hazard: the 30 days after one carry more risk than 30 days a year later.
    later = oracle.true_risk(history, t + np.timedelta64(365, "D"), 30, "admission", subjects=sid, samples=8)
    both = ~np.isnan(later.probability)
    assert both.sum() > 100
    assert risk.probability[both].mean() > 1.3 * later.probability[both].mean()


def test_expected_weekly_admissions_match_the_cohort(events, oracle, history):
    as_of = np.datetime64("2025-01-01")
    weeks = oracle.expected_weekly_admissions(history, as_of, 52, samples=8, seed=4)
    assert weeks.week_start[0] == as_of and weeks.expected.shape == (52,)
    births = events.filter(pc.equal(events["code"], "MEDS_BIRTH"))
    cohort = births["subject_id"].to_numpy()[_times(births) <= as_of]
    adm = events.filter(pc.starts_with(events["code"], "ADMIT//"))
    t = _times(adm)
    sel = (t > as_of) & np.isin(adm["subject_id"].to_numpy(), cohort)
    week = ((t[sel] - as_of) // np.timedelta64(7, "D")).astype(np.int64)
    observed = np.bincount(week[week < 52], minlength=52)[:52]  # the data end 52 weeks + 2 days after as_of
    e = weeks.expected.sum()
    var = e + (weeks.stderr**2).sum() * 52  # Poisson noise + (conservatively) fully correlated MC error
    assert abs(observed.sum() - e) < TOL_SE * math.sqrt(var), (observed.sum(), e)
    assert ((observed - weeks.expected) ** 2 / weeks.expected).sum() < chi2.ppf(1 - CAL_P, 52)
    # The forecast knows the season: the first weeks (January) expect more than mid-year weeks.
    assert weeks.expected[:6].mean() > 1.1 * weeks.expected[24:30].mean()


# --- round trips through the project's own sources --------------------------------------------------------


def test_meds_output_loads_through_the_meds_source(small, tmp_path):
    with warehouse.connect(tmp_path / "w.duckdb") as con:
        summary = sources.load("meds", con, small, source="sim")
        assert summary.rows_quarantined == 0 and summary.rows_dropped == 0
        assert summary.subjects == 1_500
        written = ds.dataset(small / "data").to_table()
        assert summary.events == written.num_rows
        cols = "subject_id, time, code, numeric_value, unit"
        loaded = con.sql(f"SELECT {cols} FROM events ORDER BY ALL").to_arrow_table()
        con.register("written", written)
        expected = con.sql(f"SELECT {cols} FROM written ORDER BY ALL").to_arrow_table()
        assert loaded.cast(expected.schema).equals(expected)  # the same events, value for value
        splits = dict(con.execute("SELECT subject_id, split FROM subject_splits").fetchall())
        assert all(splits[i] == schema.split_of(i) for i in range(1, 1_501))


def test_synthea_output_loads_through_the_synthea_source(small, tmp_path):
    with warehouse.connect(tmp_path / "w.duckdb") as con:
        summary = sources.load("synthea", con, small / "csv", source="sim-synthea")
        assert summary.rows_quarantined == 0, con.execute("SELECT * FROM quarantine LIMIT 5").fetchall()
        assert summary.subjects == 1_500
        written = {name: len((small / "csv" / f"{name}.csv").read_text().splitlines()) - 1
                   for name in ("patients", "encounters", "conditions", "medications", "observations",
                                "procedures")}
        assert set(written) <= {t.table for t in summary.tables}  # every file counted, none skipped silently
        for t in summary.tables:
            if t.table in written:
                assert t.rows_read == written[t.table], t
        # The same people, deaths and admissions as the MEDS copy of the same simulation.
        meds = ds.dataset(small / "data").to_table(columns=["subject_id", "code"])
        n_deaths = pc.sum(pc.equal(meds["code"], "MEDS_DEATH")).as_py()
        n_admits = pc.sum(pc.starts_with(meds["code"], "ADMIT//")).as_py()
        assert con.execute("SELECT count(*) FROM events WHERE code = 'MEDS_DEATH'").fetchall()[0][0] == n_deaths
        assert con.execute("SELECT count(*) FROM events WHERE code LIKE 'ADMIT//%'").fetchall()[0][0] == n_admits
        n_obs = con.execute("SELECT count(*) FROM events WHERE code LIKE '%LOINC//%'").fetchall()[0][0]
        assert n_obs == written["observations"]
