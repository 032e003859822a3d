"""The simulator's oracle for the admission-time tasks (in-hospital death, ICU during the stay, LOS > 7 days)
against what happened in a simulated cohort, labelled by ``foresight.evaluate``'s own rule.

Tolerances: overall, the observed count within 3 binomial standard errors of the oracle's expected count; by
decile of the oracle's probability, within 4. The probabilities are exact (closed form, no Monte Carlo), so the
only noise is the outcomes' own. Discrimination: the oracle's AUROC on these outcomes is above 0.6 and within 0.05
of the AUROC its own probabilities imply (the expected AUROC if each outcome is drawn with the oracle's
probability): what the hazards allow, not a number tuned to pass. Seeds are fixed, so the checks are
deterministic. Measured on this cohort, a length-of-stay window off by half a day moves the overall count by 6-7
SE, and a death model that ignores the ICU transfer or the comorbidities by 4.6 and 7.3 SE. Admissions before the
cohort's entry date are survivor-selected (no one in the cohort died before 2000): the oracle gives them NaN, and
they are left out of the checks.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from foresight import sources, warehouse
from foresight.demo import demo_config
from foresight.evaluate import ADMISSION_TASKS, observed_labels, prediction_points
from foresight.pipeline import simulator_oracle
from foresight.simulate import Oracle, read_history, simulate

N_LIVES = 3_000  # the demo's hazards (admissions x3): ~14,000 admissions, ~10,000 of them from 2000 on
OVERALL_SE, DECILE_SE = 3.0, 4.0
ALIVE_FROM = datetime(2000, 1, 1)  # the cohort's entry date (calendar.alive_from of the demo's config)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every admission (with a complete stay) of a simulated cohort, in a warehouse loaded through the MEDS source."""
    d: Path = tmp_path_factory.mktemp("stay_oracle")
    simulate(N_LIVES, d / "sim", seed=7, config=demo_config())
    with warehouse.connect(d / "w.duckdb") as con:
        sources.load("meds", con, d / "sim")
        ids = [r[0] for r in con.execute("SELECT DISTINCT subject_id FROM events").fetchall()]
        points = prediction_points(con, ids, mode="admissions", max_per_subject=10**9)
        labels = {name: observed_labels(con, task, points) for name, task in ADMISSION_TASKS.items()}
    return {"sim": d / "sim", "points": points, "labels": labels, "oracle": simulator_oracle(d / "sim")}


def implied_auroc(p: np.ndarray) -> float:
    """The AUROC expected if each outcome were drawn with probability ``p``: sum over pairs (i positive, j negative)
    of p_i (1 - p_j) [p_i > p_j, ties half] over the sum of p_i (1 - p_j), i != j."""
    order = np.argsort(p, kind="stable")
    ps = p[order]
    neg = 1.0 - ps
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives' weight strictly earlier in the order
    # ties: the weight of equal probabilities counts half, whatever their order
    _, first, counts = np.unique(ps, return_index=True, return_counts=True)
    grp = np.repeat(np.arange(first.size), counts)
    tie_sum = np.add.reduceat(neg, first)[grp]
    below = below[first][grp] + 0.5 * (tie_sum - neg)
    pairs = ps.sum() * neg.sum() - (ps * neg).sum()
    return float((ps * below).sum() / pairs)


@pytest.mark.parametrize("task", list(ADMISSION_TASKS))
def test_admission_oracle_is_calibrated_and_discriminates(cohort, task):
    points, y = cohort["points"], cohort["labels"][task]
    p = cohort["oracle"](ADMISSION_TASKS[task], points)
    before = np.array([pt.time < ALIVE_FROM for pt in points])
    # survivor-selected stays (before the cohort's entry date) get no probability; every other admission does
    assert np.isnan(p[before]).all() and np.isfinite(p[~before]).all()
    p, y = p[~before], y[~before]
    assert p.size > 8_000 and ((p >= 0) & (p <= 1)).all()
    se = math.sqrt(float((p * (1 - p)).sum()))
    z = (y.sum() - p.sum()) / se
    assert abs(z) < OVERALL_SE, f"{task}: observed {y.sum():.0f} vs oracle {p.sum():.1f} (z = {z:.2f})"
    edges = np.quantile(p, np.linspace(0, 1, 11))
    decile = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    for d in range(10):
        sel = decile == d
        obs, exp = y[sel].sum(), p[sel].sum()
        sd = math.sqrt(max(float((p[sel] * (1 - p[sel])).sum()), 1e-9))
        assert abs(obs - exp) < DECILE_SE * sd + 1e-9, (
            f"{task} decile {d}: observed {obs:.0f} vs oracle {exp:.1f} ({(obs - exp) / sd:+.2f} SE)")
    auc, implied = roc_auc_score(y, p), implied_auroc(p)
    assert auc > 0.6 and abs(auc - implied) < 0.05, f"{task}: AUROC {auc:.3f}, implied by the oracle {implied:.3f}"


def test_stay_risk_follows_the_record_through_the_stay(cohort):
    """Two hours in, the ICU transfer is known: no transfer is still to come, and a stay seen going to ICU carries
    more risk of death. The ICU probability at admission agrees with the Monte-Carlo oracle's in-stay part (a 2.5-h
    horizon ends before any discharge, so true_risk's ICU risk is exactly that of the stay)."""
    orc = Oracle.from_dir(cohort["sim"])
    hist = read_history(cohort["sim"], orc.model)
    keep = [i for i, pt in enumerate(cohort["points"]) if pt.time >= ALIVE_FROM]
    sid = np.array([cohort["points"][i].subject_id for i in keep])
    t = np.array([np.datetime64(cohort["points"][i].time, "us") for i in keep])
    soon = t + np.timedelta64(30, "m")
    at_admission = orc.stay_risk(hist, soon, "icu_during_stay", subjects=sid)
    mc = orc.true_risk(hist, soon, 2.5 / 24, "icu_admission", subjects=sid, samples=2)
    np.testing.assert_allclose(at_admission.probability, mc.probability, rtol=1e-9, atol=1e-12)
    assert (at_admission.stderr == 0).all() and at_admission.probability.mean() > 0.05
    later = t + np.timedelta64(3, "h")
    assert (orc.stay_risk(hist, later, "icu_during_stay", subjects=sid).probability == 0).all()
    death = orc.stay_risk(hist, later, "in_hospital_death", subjects=sid).probability
    icu_seen = cohort["labels"]["icu_during_stay"][keep] == 1
    assert death[icu_seen].mean() > 1.5 * death[~icu_seen].mean()
    # no stay in progress a minute before an admission; a stay window is needed; the events are the stay's own
    before = orc.stay_risk(hist, t - np.timedelta64(1, "m"), "in_hospital_death", subjects=sid).probability
    assert np.isnan(before).mean() > 0.99
    with pytest.raises(ValueError, match="window_days"):
        orc.stay_risk(hist, t, "stay_over", subjects=sid)
    with pytest.raises(ValueError, match="unknown stay event"):
        orc.stay_risk(hist, t, "death", subjects=sid)
