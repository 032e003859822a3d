"""Catchment forecasts (issue 18): why futures held ~1.8x the admissions, predictive intervals for counts, the
open-cohort rule, strata, suppression of published strata, and the backtest's JSON."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import pytest
import torch

from foresight import tokens as T
from foresight import warehouse
from foresight.forecast import Forecaster
from foresight.forecast.cohorts import arrival_events, cohort_as_of
from foresight.forecast.counts import Tallies, published, summarise, week_rows
from foresight.forecast.intervals import crps_samples, predictive_quantiles
from foresight.forecast.population import forecast_cohort
from foresight.forecast.timeline import Timeline
from foresight.suppression import SuppressionRule

from .conftest import cli_json, tiny_llama, tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A synthetic warehouse, its vocabulary and a randomly initialised tiny Llama saved as a model folder."""
    d = tmp_path_factory.mktemp("catch")
    db = tiny_warehouse(d / "w.duckdb", n_subjects=60)
    # no MONTH markers: the hand-computed futures below (fixed_next_token) have no calendar months to write
    T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=3, month_tokens=False))
    vocab = T.Vocabulary.load(d / "tok" / "vocab.json")
    model = tiny_llama(vocab)
    model.save_pretrained(d / "model")
    vocab.save(d / "model" / "vocab.json")
    return {"db": db, "vocab": vocab, "fc": Forecaster(model, vocab), "model": d / "model"}


def fixed_next_token(vocab: T.Vocabulary, probs: dict[str, float]) -> Forecaster:
    """A Forecaster whose model puts the same next-token distribution ``probs`` after any prefix (a real Llama
    with its output layer replaced by a constant), so what the sampler does with it can be computed by hand."""
    model = tiny_llama(vocab)
    head = torch.nn.Linear(model.config.hidden_size, len(vocab.tokens), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-40.0)
        for tok, p in probs.items():
            head.bias[vocab.index[tok]] = math.log(p)
    model.lm_head = head
    return Forecaster(model, vocab)


def prompt(vocab: T.Vocabulary, clock: datetime, as_of: datetime) -> Timeline:
    return Timeline(np.array([vocab.index["[BOS]"], vocab.index["ADMIT//EMERGENCY"]]), clock, as_of)


# --- the finding: why the futures held ~1.8x the admissions -----------------------------------------------------


def test_end_of_extract_is_censoring_not_renormalised_away(tiny):
    """[END] in training marks the end of the data extract: it replaced every gap that would have crossed it, so
    near the extract's end a model puts the "long quiet gap" mass on [END]. The sampler banned [END] and
    renormalised, i.e. drew every gap as if the next event had to come before the extract's end: too many events
    (on 10k simulated lives, as of 7 months before the end: 48 admissions forecast, 27 expected by the oracle, 24
    observed; with [END] as censoring: 30). Here: each step [END] 1/2, a one-to-two-week gap 1/4 (9.9 days), an
    admission 1/4, 28-day horizon. With [END] = "no event before the extract's end" (the extract ends years
    later) the expected admissions are 1/3 + 1/9 + 1/27 = 13/27; renormalised away, 3."""
    vocab = tiny["vocab"]
    fc = fixed_next_token(vocab, {"[END]": 0.5, "TIME//1W-2W": 0.25, "ADMIT//EMERGENCY": 0.25})
    t0 = datetime(2024, 1, 1)
    tl = prompt(vocab, t0, t0)
    groups = [["ADMIT//EMERGENCY"]]
    realized, expected = fc.weekly_tallies([tl], 2000, 28, groups, seed=1, extract_end=t0 + timedelta(days=3650))
    assert realized.sum(axis=(2, 3)).mean() == pytest.approx(13 / 27, abs=0.06)
    assert expected.sum(axis=(2, 3)).mean() == pytest.approx(13 / 27, abs=0.03)  # Rao-Blackwellised: tighter
    old, _ = fc.weekly_tallies([tl], 500, 28, groups, seed=1)  # no extract end: [END] banned, the old rule
    assert old.sum(axis=(2, 3)).mean() == pytest.approx(3.0, abs=0.3)
    # the decoded futures agree with the token tally
    futures = fc.sample_futures([tl], 300, 28, seed=2, extract_end=t0 + timedelta(days=3650))[0]
    assert np.mean([sum(e["code"] == "ADMIT//EMERGENCY" for e in f) for f in futures]) == pytest.approx(
        13 / 27, abs=0.12)


def test_first_gap_is_drawn_inside_its_bin_above_the_elapsed_wait(tiny):
    """A subject last seen 200 days before as_of: the first gap is only known to exceed 200 days. The old sampler
    moved the clock by the bin's representative length (258 days for 6 months-1 year), putting every such
    subject's next event 58 days after as_of — inside an 84-day horizon, always. Drawn log-uniformly in the bin
    above the wait, it falls inside with probability ln(284/200) / ln(365.25/200) = 0.58; then admissions
    follow until the next half-year gap (one on average)."""
    vocab = tiny["vocab"]
    fc = fixed_next_token(vocab, {"TIME//6MO-1Y": 0.5, "ADMIT//EMERGENCY": 0.5})
    t0 = datetime(2024, 1, 1)
    tl = prompt(vocab, t0, t0 + timedelta(days=200))
    realized, _ = fc.weekly_tallies([tl], 2000, 84, [["ADMIT//EMERGENCY"]], seed=3)
    assert realized.sum(axis=(2, 3)).mean() == pytest.approx(math.log(284 / 200) / math.log(365.25 / 200),
                                                             abs=0.07)
    firsts = [f[0]["time"] for f in fc.sample_futures([tl], 400, 84, seed=4)[0] if f]
    days = np.array([(t - tl.as_of).total_seconds() / 86400 for t in firsts])
    assert days.min() < 10 and days.max() > 70  # spread over the horizon, not all at +58 days


# --- intervals ------------------------------------------------------------------------------------------------


def test_band_covers_a_known_poisson_rate_and_the_monte_carlo_spread_alone_does_not():
    """500 people, each with a known weekly rate (20 a week in all); 8 futures each give noisy Rao-Blackwellised
    expectations and realized counts; the outcome is Poisson. The predictive band (estimate + outcome noise)
    covers ~90% of 400 weeks; a band from the estimate's Monte Carlo spread alone covers far fewer."""
    rng = np.random.default_rng(0)
    people, futures, weeks = 500, 8, 400
    rate = rng.gamma(2.0, 20 / people / 2.0, size=people)
    rate *= 20 / rate.sum()
    noisy = rate[:, None, None] * rng.gamma(4.0, 0.25, size=(people, futures, weeks))
    tallies = Tallies(rng.poisson(np.broadcast_to(rate[:, None, None], noisy.shape))[..., None],
                      noisy[..., None], ["ADMIT//EMERGENCY"], ["45-64"] * people, np.ones(people))
    s = summarise(tallies)
    rows = week_rows(datetime(2024, 1, 1), s)
    y = rng.poisson(20, size=weeks)
    cov90 = np.mean([r["p05"] <= v <= r["p95"] for r, v in zip(rows, y, strict=True)])
    cov50 = np.mean([r["p25"] <= v <= r["p75"] for r, v in zip(rows, y, strict=True)])
    assert 0.85 <= cov90 <= 0.97 and 0.4 <= cov50 <= 0.7
    naive = np.mean([abs(v - r["mean"]) <= 1.645 * r["se"] for r, v in zip(rows, y, strict=True)])
    assert naive < 0.5
    assert s.mean.mean() == pytest.approx(20, rel=0.05) and 0.9 <= s.dispersion.mean() <= 1.2
    # one future has no spread to measure: its Monte Carlo error is bounded, not taken as zero
    one = summarise(Tallies(tallies.realized[:, :1], tallies.expected[:, :1], tallies.groups, tallies.ages,
                            tallies.weights))
    assert (one.se ** 2 >= 0.9 * one.mean).all()
    # the helpers behave at the edges
    assert predictive_quantiles(0.0) == [0.0] * 5 and crps_samples(np.array([3.0, 3.0]), 3.0) == 0.0


# --- open cohorts, strata, suppression --------------------------------------------------------------------------


def test_open_cohort_adds_last_years_arrivals(tiny):
    """The rule: closed-cohort forecast + the admissions, in the same weeks one year (364 days) earlier, of people
    not in the cohort at that earlier date, spread evenly over the weeks. Checked against the rows by hand."""
    fc, db = tiny["fc"], tiny["db"]
    with warehouse.connect(db, read_only=True) as con:
        firsts = con.execute("SELECT subject_id, min(time) FROM events WHERE code <> 'MEDS_BIRTH' "
                             "AND time IS NOT NULL GROUP BY 1 ORDER BY 2").fetchall()
        origin = firsts[30][1] - timedelta(days=3)  # subject 31 (and later ones) arrive after it
        as_of, weeks = origin + timedelta(days=364), 4
        before = set(cohort_as_of(con, origin))
        rows = con.execute("SELECT subject_id, time, code FROM events WHERE code LIKE 'ADMIT//%'").fetchall()
        by_hand = sorted((t, c) for s, t, c in rows if s not in before and origin <= t < origin + timedelta(weeks=4))
        assert len(by_hand) >= 1
        got = arrival_events(con, as_of, weeks)
        assert sorted(c for _, c, _ in got) == sorted(c for _, c in by_hand) and len(got) == len(by_hand)
        run = forecast_cohort(fc, con, as_of, 7 * weeks, samples=2, history_weeks=0, open_cohort=True)
        closed = forecast_cohort(fc, con, as_of, 7 * weeks, samples=2, history_weeks=0, open_cohort=False)
    f = run.forecast
    assert f.open_cohort["inflow_per_week"] == pytest.approx(len(by_hand) / weeks)
    assert f.total["mean"] == pytest.approx(closed.forecast.total["mean"] + len(by_hand))
    assert f.open_cohort["closed_total"]["mean"] == pytest.approx(closed.forecast.total["mean"])
    assert closed.forecast.open_cohort is None


def test_strata_sum_to_the_total_and_published_strata_are_suppressed(tiny):
    fc, db = tiny["fc"], tiny["db"]
    with warehouse.connect(db, read_only=True) as con:
        as_of = datetime(2021, 6, 1)
        run = forecast_cohort(fc, con, as_of, 21, samples=3, history_weeks=0, strata=("type", "age"),
                              open_cohort=True)
    f = run.forecast
    assert set(f.strata) == {"type", "age"} and len(f.strata["age"]) >= 2
    for rows in f.strata.values():
        assert sum(r["mean"] for r in rows) == pytest.approx(f.total["mean"])
        for w in range(len(f.weeks)):
            assert sum(r["weeks"][w]["mean"] for r in rows) == pytest.approx(f.weeks[w]["mean"])
        for r in rows:
            assert r["p05"] <= r["p25"] <= r["p75"] <= r["p95"]
    # published: every number through the service's rule (0-7 -> "<8", else the nearest 5)
    row = {"stratum": "80+", "mean": 3.2, "p05": 0, "p25": 2, "p50": 3, "p75": 5, "p95": 9,
           "weeks": [{"week_start": "2021-06-01", "mean": 12.4, "p05": 7, "p25": 9, "p50": 12, "p75": 15, "p95": 18,
                      "se": 1.0}]}
    assert published({"age": [row]}, SuppressionRule()) == {"age": [{
        "stratum": "80+", "mean": "<8", "p05": "<8", "p25": "<8", "p50": "<8", "p75": "<8", "p95": 10,
        "weeks": [{"week_start": "2021-06-01", "mean": 10, "p05": "<8", "p25": 10, "p50": 10, "p75": 15,
                   "p95": 20}]}]}


def test_cli_forecast_publishes_suppressed_strata_and_backtest_json(tiny, tmp_path):
    model, db = tiny["model"], tiny["db"]
    got = cli_json("forecast", "--model", str(model), "--db", str(db), "--as-of", "2021-06-01", "--horizon-days",
                   "14", "--samples", "2", "--strata", "type,age", "--history-weeks", "2")
    assert {"weeks", "strata", "cohort_size", "total"} <= set(got) and got["strata_suppressed"] is True
    assert {"mean", "p05", "p25", "p75", "p95"} <= set(got["weeks"][0])
    for rows in got["strata"].values():
        for r in rows:
            for v in [r["mean"], r["p05"], r["p95"], *(w["mean"] for w in r["weeks"])]:
                assert v == "<8" or (isinstance(v, int) and v % 5 == 0 and v >= 8), v
    bt = cli_json("backtest", "--model", str(model), "--db", str(db), "--origins", "2", "--horizon-weeks", "2",
                  "--samples", "1", "--split", "all", "--codes", "ADMIT//*", "--out", str(tmp_path / "bt"))
    assert len(bt["origins"]) == 2 and bt["horizon_weeks"] == 2
    assert {"model", "model_closed", "seasonal_naive", "moving_average", "glm", "ets"} <= set(bt["methods"])
    for m in bt["methods"].values():
        assert {"mape", "mase", "coverage50", "coverage90", "crps"} <= set(m)
        assert 0 <= m["coverage90"] <= 1 and m["crps"] >= 0
    assert bt["methods"]["seasonal_naive"]["mase"] == pytest.approx(1.0)
    assert (tmp_path / "bt" / "backtest.json").exists() and (tmp_path / "bt" / "backtest_weeks.csv").exists()
