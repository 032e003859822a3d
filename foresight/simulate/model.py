"""The simulator's hazards: one explicit, JSON-serialisable configuration and the vectorised maths that reads it.

Every process is a hazard (events per person-year) of the form::

    rate(t) = base(age) * prod(HR[feature] ** x_feature) * season(t) * eligible

- ``base(age)``: events per 1,000 person-years at ages 0, 10, ..., 100 (``AGE_KNOTS``), interpolated
  log-linearly and held constant within each year of age (so hazards only change at birthdays and events);
- features: sex, race, ethnicity, each condition bit, prior admissions (capped at 5) and time since the last
  discharge (0-30, 30-90, 90-365 days);
- ``season(t) = 1 + amplitude * cos(2 pi (t / 365.2425 days - peak))`` with ``peak`` a fraction of the year
  (0.04 = mid January; t counted from 1970-01-01, a year start);
- eligibility: a process needs its ``requires`` bits and none of its ``excludes`` bits (an onset excludes its own).

Kinds of process: ``onset`` (a chronic condition is diagnosed at a primary-care visit), ``admission`` (a hospital
stay with a cause; its course -- length, ICU, death, discharge -- is drawn from ``stays``), ``death``
(out-of-hospital death) and ``gp`` (primary-care visits that change nothing: routine reviews and acute problems).
``onset``, ``admission`` and ``death`` form the competing-risk engine; ``gp`` processes are outputs only.

Nothing here draws a random number or touches a file: the engine samples, the writers write.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from foresight.simulate import catalog as cat

YEAR: Final = 365.25  # days per year of age (ages and birthdays)
SEASON_YEAR: Final = 365.2425  # days per calendar year (seasonality; 1970-01-01 is a year start)
AGE_KNOTS: Final = tuple(range(0, 101, 10))
MAX_AGE: Final = 120  # age table length; the base rate is flat after the last knot
N_PRIOR_CAP: Final = 5
FEATURES: Final = (
    "male", "black", "asian", "other_race", "hispanic",
    *(c.name for c in cat.CONDITIONS),
    "prior_admissions", "discharged_0_30d", "discharged_30_90d", "discharged_90_365d",
)
RECENCY_EDGES: Final = (30.0, 90.0, 365.0)  # days after a discharge where the recency features change

_EMERGENCY_HR = {"prior_admissions": 1.08, "discharged_0_30d": 2.6, "discharged_30_90d": 1.6,
                 "discharged_90_365d": 1.25}


def _p(kind: str, target: str, per_1000py: list[float], hr: dict[str, float] | None = None,
       season: tuple[float, float] = (0.0, 0.04), requires: tuple[str, ...] = (),
       excludes: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"kind": kind, "target": target, "per_1000py": per_1000py, "hr": hr or {},
            "season": list(season), "requires": list(requires), "excludes": list(excludes)}


def _adm(cause: str, per_1000py: list[float], hr: dict[str, float] | None = None, season: float = 0.0,
         peak: float = 0.04, requires: tuple[str, ...] = (), excludes: tuple[str, ...] = ()) -> dict[str, Any]:
    emergency = cat.CAUSES[cat.CAUSE[cause]].admit == "EMERGENCY"
    merged = {**(_EMERGENCY_HR if emergency else {}), **(hr or {})}
    return _p("admission", cause, per_1000py, merged, (season, peak), requires, excludes)


#                                           age 0    10    20    30    40    50    60    70    80    90   100
DEFAULT_PROCESSES: Final[dict[str, dict[str, Any]]] = {
    # --- chronic onsets (diagnosed at a primary-care visit) ---
    "ONSET_OBESITY": _p("onset", "OBESITY", [2, 6, 10, 10, 9, 8, 6, 3, 1, 0.5, 0.5],
                        {"black": 1.4, "hispanic": 1.3, "asian": 0.5, "DEPRESSION": 1.3}),
    "ONSET_SMOKER": _p("onset", "SMOKER", [0, 2, 25, 8, 3, 1, 0.5, 0.2, 0.05, 0.05, 0.05],
                       {"male": 1.3, "DEPRESSION": 1.5, "asian": 0.7}),
    "ONSET_HTN": _p("onset", "HTN", [0.02, 0.1, 1, 3, 8, 16, 24, 30, 35, 35, 35],
                    {"OBESITY": 2.0, "T2D": 1.5, "CKD": 1.8, "black": 1.6, "male": 1.2}),
    "ONSET_T2D": _p("onset", "T2D", [0.03, 0.1, 0.3, 0.7, 1.8, 3.5, 5, 5.5, 5, 4, 4],
                    {"OBESITY": 3.0, "HTN": 1.3, "hispanic": 1.5, "black": 1.4, "asian": 1.5, "male": 1.2}),
    "ONSET_CKD": _p("onset", "CKD", [0.01, 0.02, 0.1, 0.3, 0.8, 2, 4.5, 10, 20, 28, 28],
                    {"T2D": 2.5, "HTN": 2.0, "HF": 1.5, "black": 1.5}),
    "ONSET_HF": _p("onset", "HF", [0.001, 0.001, 0.01, 0.02, 0.09, 0.27, 0.7, 1.6, 3.6, 6.3, 6.3],
                   {"HTN": 1.8, "T2D": 1.5, "CKD": 1.8, "AF": 2.5, "CAD": 2.0, "HX_MI": 3.0, "OBESITY": 1.5,
                    "male": 1.3, "COPD": 1.3}),
    "ONSET_COPD": _p("onset", "COPD", [0.001, 0.001, 0.02, 0.1, 0.5, 1.5, 3, 4, 4, 3, 3],
                     {"SMOKER": 5.0, "ASTHMA": 2.0}),
    "ONSET_ASTHMA": _p("onset", "ASTHMA", [6, 3, 1.5, 1, 1, 0.8, 0.6, 0.5, 0.4, 0.3, 0.3],
                       {"OBESITY": 1.5, "SMOKER": 1.3}),
    "ONSET_DEPRESSION": _p("onset", "DEPRESSION", [0.1, 2, 8, 7, 6, 5, 4, 4, 5, 5, 5],
                           {"male": 0.55, "OBESITY": 1.3, "HF": 1.5, "COPD": 1.4, "HX_STROKE": 2.0}),
    "ONSET_AF": _p("onset", "AF", [0.001, 0.001, 0.012, 0.06, 0.18, 0.6, 1.8, 4.2, 9, 13, 13],
                   {"HTN": 1.7, "HF": 3.0, "CAD": 1.5, "OBESITY": 1.4, "male": 1.5, "HX_MI": 1.5}),
    "ONSET_CAD": _p("onset", "CAD", [0.001, 0.001, 0.004, 0.06, 0.35, 1, 2, 3, 3.6, 3.6, 3.6],
                    {"male": 2.0, "SMOKER": 2.0, "T2D": 2.0, "HTN": 1.7, "OBESITY": 1.3, "CKD": 1.5}),
    "ONSET_DEMENTIA": _p("onset", "DEMENTIA", [0.001, 0.001, 0.001, 0.001, 0.02, 0.2, 1, 5, 20, 45, 60],
                         {"HX_STROKE": 2.0, "T2D": 1.5, "DEPRESSION": 1.5}),
    "ONSET_OSTEOPOROSIS": _p("onset", "OSTEOPOROSIS", [0.001, 0.001, 0.001, 0.05, 0.5, 2, 5, 10, 15, 15, 15],
                             {"male": 0.25, "SMOKER": 1.5, "asian": 1.3, "black": 0.6}),
    "ONSET_OA_KNEE": _p("onset", "OA_KNEE", [0.001, 0.001, 0.05, 0.3, 1.5, 4, 7, 9, 9, 7, 7],
                        {"OBESITY": 2.5, "male": 0.7}),
    # --- emergency admissions, by cause (coded at discharge) ---
    "ADMIT_PNEUMONIA": _adm("PNEUMONIA", [12, 1.5, 0.8, 1, 1.5, 2.5, 4, 8, 18, 35, 45],
                            {"COPD": 3.0, "HF": 2.0, "SMOKER": 1.6, "DEMENTIA": 2.5, "ASTHMA": 1.5, "T2D": 1.3,
                             "CKD": 1.3, "HX_STROKE": 1.5}, season=0.5),
    "ADMIT_INFLUENZA": _adm("INFLUENZA", [3, 0.5, 0.2, 0.2, 0.3, 0.5, 1, 2, 4, 7, 8],
                            {"COPD": 2.0, "HF": 1.6, "ASTHMA": 1.6}, season=0.9),
    "ADMIT_UTI": _adm("UTI", [3, 0.5, 1, 1, 1, 1.2, 1.8, 4, 9, 18, 22],
                      {"male": 0.4, "T2D": 1.4, "DEMENTIA": 2.5}, season=0.1),
    "ADMIT_SEPSIS": _adm("SEPSIS", [2, 0.2, 0.2, 0.3, 0.5, 1, 2, 4, 8, 14, 16],
                         {"T2D": 1.5, "CKD": 1.6, "DEMENTIA": 1.8, "COPD": 1.4, "HF": 1.4}, season=0.2),
    "ADMIT_COPD_EXAC": _adm("COPD_EXAC", [1, 1, 20, 30, 40, 50, 60, 70, 80, 90, 90], {"HF": 1.4, "SMOKER": 1.2},
                            season=0.5, requires=("COPD",)),
    "ADMIT_ASTHMA_EXAC": _adm("ASTHMA_EXAC", [15, 8, 4, 4, 4, 4, 5, 6, 7, 7, 7], {"SMOKER": 1.5}, season=0.3,
                              requires=("ASTHMA",)),
    "ADMIT_HF_EXAC": _adm("HF_EXAC", [60, 60, 60, 70, 80, 90, 100, 110, 130, 150, 150],
                          {"CKD": 1.4, "AF": 1.3, "COPD": 1.2}, season=0.25, requires=("HF",)),
    "ADMIT_HF_ONSET": _adm("HF_ONSET", [0.001, 0.001, 0.006, 0.016, 0.063, 0.19, 0.47, 1.1, 2.5, 4.4, 4.4],
                           {"HTN": 1.8, "T2D": 1.5, "CKD": 1.8, "AF": 2.5, "CAD": 2.0, "HX_MI": 3.0, "OBESITY": 1.5,
                            "male": 1.3, "COPD": 1.3}, season=0.2, excludes=("HF",)),
    "ADMIT_MI": _adm("MI", [0.001, 0.001, 0.012, 0.065, 0.25, 0.6, 1.2, 2, 3.2, 4.4, 4.8],
                     {"male": 2.0, "SMOKER": 2.2, "T2D": 1.8, "HTN": 1.5, "CAD": 2.5, "HX_MI": 2.0, "CKD": 1.5,
                      "OBESITY": 1.2}, season=0.15),
    "ADMIT_STROKE": _adm("STROKE", [0.014, 0.014, 0.035, 0.07, 0.2, 0.55, 1.4, 3.5, 7, 10.5, 11],
                         {"AF": 3.0, "HTN": 2.0, "T2D": 1.5, "SMOKER": 1.6, "HX_STROKE": 2.5}, season=0.1),
    "ADMIT_HIP_FRACTURE": _adm("HIP_FRACTURE", [0.05, 0.1, 0.1, 0.1, 0.15, 0.3, 0.8, 2.5, 8, 20, 25],
                               {"OSTEOPOROSIS": 2.5, "DEMENTIA": 2.0, "male": 0.5, "HX_STROKE": 1.5}, season=0.15),
    "ADMIT_AKI": _adm("AKI", [0.2, 0.05, 0.1, 0.1, 0.2, 0.4, 0.8, 1.8, 4, 7, 8], {"CKD": 3.0, "T2D": 1.5, "HF": 2.0},
                      season=0.1),
    "ADMIT_HYPOGLYCEMIA": _adm("HYPOGLYCEMIA", [3, 3, 3, 3, 3, 3, 4, 5, 8, 10, 10], {"CKD": 2.0},
                               requires=("T2D",)),
    "ADMIT_GI_BLEED": _adm("GI_BLEED", [0.1, 0.05, 0.2, 0.3, 0.5, 0.8, 1.3, 2.2, 4, 6, 6],
                           {"AF": 1.8, "CKD": 1.5, "male": 1.3}),
    "ADMIT_CHEST_PAIN": _adm("CHEST_PAIN", [0.1, 0.2, 1, 2, 3.5, 4.5, 5, 5, 5, 4, 4],
                             {"CAD": 2.5, "HX_MI": 1.5, "HTN": 1.3, "OBESITY": 1.3, "DEPRESSION": 1.3}),
    "ADMIT_CELLULITIS": _adm("CELLULITIS", [0.5, 0.5, 0.8, 1, 1.2, 1.5, 2, 3, 4, 5, 5], {"T2D": 1.8, "OBESITY": 1.8},
                             season=0.15, peak=0.54),
    "ADMIT_APPENDICITIS": _adm("APPENDICITIS", [0.3, 1.8, 1.5, 1, 0.8, 0.6, 0.4, 0.3, 0.3, 0.3, 0.3], {"male": 1.2}),
    # --- elective admissions ---
    "ADMIT_KNEE_REPLACEMENT": _adm("KNEE_REPLACEMENT", [0.001, 0.001, 0.001, 2, 8, 20, 35, 45, 40, 20, 10],
                                   {"OBESITY": 1.3}, requires=("OA_KNEE",), excludes=("KNEE_REPLACED",)),
    "ADMIT_CAD_PCI": _adm("CAD_PCI", [0.001, 0.001, 0.001, 20, 30, 35, 35, 30, 20, 10, 5], requires=("CAD",)),
    "ADMIT_CHOLECYSTECTOMY": _adm("CHOLECYSTECTOMY", [0.001, 0.05, 0.8, 1.2, 1.5, 1.8, 2, 2, 1.5, 1, 0.5],
                                  {"male": 0.5, "OBESITY": 2.0}, excludes=("NO_GALLBLADDER",)),
    "ADMIT_HERNIA_REPAIR": _adm("HERNIA_REPAIR", [0.5, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 2, 1.5, 1], {"male": 3.0}),
    # --- out-of-hospital death ---
    "DEATH": _p("death", "DEATH", [4, 0.15, 0.45, 0.7, 1, 1.7, 2.8, 5, 12, 38, 100],
                {"male": 1.4, "SMOKER": 1.8, "T2D": 1.4, "CKD": 1.6, "HF": 2.5, "COPD": 1.8, "DEMENTIA": 3.0,
                 "AF": 1.3, "HX_MI": 1.5, "HX_STROKE": 1.6, "HX_HIP_FRACTURE": 1.5, "DEPRESSION": 1.2, "OBESITY": 1.2,
                 "discharged_0_30d": 2.5, "discharged_30_90d": 1.6, "discharged_90_365d": 1.2}, (0.15, 0.04)),
    # --- primary care that changes nothing (outputs only) ---
    "GP_ROUTINE": _p("gp", "ROUTINE", [1500, 400, 400, 500, 700, 900, 1300, 1900, 2600, 3000, 3000],
                     {"male": 0.8, **{c: 1.15 for c in ("HTN", "T2D", "CKD", "HF", "COPD", "ASTHMA", "DEPRESSION",
                                                      "AF", "CAD", "DEMENTIA", "OSTEOPOROSIS", "OA_KNEE")}}),
    "GP_URTI": _p("gp", "URTI", [250, 100, 60, 50, 50, 50, 50, 60, 70, 70, 70], {"ASTHMA": 1.5, "SMOKER": 1.3},
                  (0.6, 0.04)),
    "GP_FLU": _p("gp", "FLU", [30, 25, 15, 15, 15, 15, 20, 25, 30, 30, 30], {}, (0.95, 0.06)),
    "GP_UTI": _p("gp", "UTI", [10, 10, 30, 25, 25, 30, 40, 60, 80, 90, 90], {"male": 0.2, "T2D": 1.5}, (0.1, 0.6)),
    "GP_BRONCHITIS": _p("gp", "BRONCHITIS", [40, 15, 10, 10, 15, 20, 25, 35, 45, 45, 45],
                        {"SMOKER": 1.5, "COPD": 2.0, "ASTHMA": 1.5}, (0.5, 0.04)),
    "GP_BACK_PAIN": _p("gp", "BACK_PAIN", [0.1, 2, 20, 30, 35, 35, 30, 25, 20, 20, 20], {"OBESITY": 1.4}),
    "GP_FALL": _p("gp", "FALL", [5, 3, 2, 2, 2, 3, 5, 10, 25, 40, 40], {"OSTEOPOROSIS": 1.5, "DEMENTIA": 2.0},
                  (0.1, 0.04)),
}

# The course of a stay, per cause: median length (days), probability of an ICU stay, probability of dying in
# hospital for a 75-year-old with no comorbidity outside the ICU.
DEFAULT_STAYS: Final[dict[str, Any]] = {
    "causes": {
        "PNEUMONIA": [5.0, 0.08, 0.035], "INFLUENZA": [3.0, 0.05, 0.015], "UTI": [3.0, 0.02, 0.01],
        "SEPSIS": [8.0, 0.35, 0.09], "COPD_EXAC": [4.0, 0.06, 0.02], "ASTHMA_EXAC": [2.0, 0.05, 0.003],
        "HF_EXAC": [6.0, 0.07, 0.03], "HF_ONSET": [7.0, 0.08, 0.03], "MI": [5.0, 0.3, 0.035],
        "STROKE": [8.0, 0.15, 0.05], "HIP_FRACTURE": [10.0, 0.03, 0.02], "AKI": [5.0, 0.05, 0.03],
        "HYPOGLYCEMIA": [2.0, 0.03, 0.005], "GI_BLEED": [4.0, 0.1, 0.025], "CHEST_PAIN": [1.0, 0.01, 0.001],
        "CELLULITIS": [4.0, 0.02, 0.004], "APPENDICITIS": [2.5, 0.02, 0.001], "KNEE_REPLACEMENT": [3.0, 0.01, 0.001],
        "CAD_PCI": [1.5, 0.04, 0.002], "CHOLECYSTECTOMY": [1.5, 0.01, 0.001], "HERNIA_REPAIR": [1.0, 0.005, 0.0005],
    },
    "los_min_days": 0.25,  # every stay lasts at least 6 hours (ICU transfer is at 2 h, labs at 1 h)
    "los_sigma": 0.7,  # log-normal spread of the length of stay beyond the minimum
    "los_per_year_of_age": 0.01,  # log length of stay per year of age above 60
    "death_per_year_of_age": 0.045,  # log-odds of in-hospital death per year of age above 75
    "death_per_comorbidity": 0.15,  # per comorbidity (catalog.COMORBIDITY_BITS), at most 6
    "death_if_icu": 1.2,
    "icu_after_hours": 2.0,
    "labs_after_hours": 1.0,
}

# Emergency admission labs: log-normal values. Log-median = log(median) + male + age * (age - 60) + bit shifts
# + cause shifts; drawn with a probability per cause ("default" for the others). Elective stays draw only the basic
# panel (creatinine, haemoglobin, sodium, potassium) with probability 0.9.
_INFECTIONS = ("PNEUMONIA", "INFLUENZA", "UTI", "SEPSIS", "COPD_EXAC", "CELLULITIS", "APPENDICITIS")
DEFAULT_ADMISSION_LABS: Final[dict[str, Any]] = {
    "CREAT": {"median": 0.8, "sigma": 0.2, "male": 0.2, "age": 0.004, "bits": {"CKD": 0.6},
              "causes": {"AKI": 1.0, "SEPSIS": 0.4, "HF_EXAC": 0.2, "HF_ONSET": 0.2}, "draw": {"default": 1.0}},
    "HGB": {"median": 13.5, "sigma": 0.08, "male": 0.1, "age": -0.001, "bits": {"CKD": -0.15},
            "causes": {"GI_BLEED": -0.45}, "draw": {"default": 1.0}},
    "NA": {"median": 139.0, "sigma": 0.025, "causes": {"HF_EXAC": -0.02, "SEPSIS": -0.015}, "draw": {"default": 1.0}},
    "K": {"median": 4.2, "sigma": 0.1, "bits": {"CKD": 0.08}, "causes": {"AKI": 0.15}, "draw": {"default": 1.0}},
    "WBC": {"median": 7.5, "sigma": 0.25, "causes": {**{c: 0.6 for c in _INFECTIONS}, "SEPSIS": 0.8},
            "draw": {"default": 1.0}},
    "TROP": {"median": 6.0, "sigma": 0.8, "bits": {"CKD": 0.5},
             "causes": {"MI": 3.5, "HF_EXAC": 0.8, "HF_ONSET": 0.8, "SEPSIS": 1.0},
             "draw": {"default": 0.15, "MI": 1.0, "CHEST_PAIN": 1.0, "HF_EXAC": 0.7, "HF_ONSET": 0.7, "STROKE": 0.5}},
    "BNP": {"median": 40.0, "sigma": 0.6, "age": 0.03, "bits": {"HF": 2.0},
            "causes": {"HF_EXAC": 1.0, "HF_ONSET": 2.3},
            "draw": {"default": 0.05, "HF_EXAC": 1.0, "HF_ONSET": 1.0, "MI": 0.4, "COPD_EXAC": 0.4, "PNEUMONIA": 0.2}},
    "CRP": {"median": 4.0, "sigma": 0.9, "causes": {c: 3.3 for c in _INFECTIONS},
            "draw": {"default": 0.3, **{c: 1.0 for c in _INFECTIONS}}},
    "GLU": {"median": 100.0, "sigma": 0.2, "bits": {"T2D": 0.45}, "causes": {"HYPOGLYCEMIA": -1.2},
            "draw": {"default": 0.5, "HYPOGLYCEMIA": 1.0}},
    "LACT": {"median": 1.2, "sigma": 0.4, "causes": {"SEPSIS": 1.0}, "draw": {"default": 0.1, "SEPSIS": 1.0}},
}
ELECTIVE_PANEL: Final = ("CREAT", "HGB", "NA", "K")

DEFAULT_CONFIG: Final[dict[str, Any]] = {
    "simulator_version": 1,
    "calendar": {
        "cutoff": "2025-12-31",  # last day with data; records end at the following midnight
        "alive_from": "2000-01-01",  # the cohort: people alive on or after this date (lives are recorded in full)
        "birth_span_years": 105,  # births are uniform over this many years before the end of the data
    },
    "demographics": {"male": 0.49, "race": {"WHITE": 0.62, "BLACK": 0.13, "ASIAN": 0.07, "OTHER": 0.18},
                     "hispanic": 0.18},
    "processes": DEFAULT_PROCESSES,
    "stays": DEFAULT_STAYS,
    "admission_labs": DEFAULT_ADMISSION_LABS,
}


def default_config() -> dict[str, Any]:
    """A deep copy of the default configuration (safe to edit)."""
    return copy.deepcopy(DEFAULT_CONFIG)


def days_since_epoch(date: str) -> float:
    """ISO date -> days since 1970-01-01 (the simulator's clock)."""
    return float(np.datetime64(date, "D").astype(np.int64))


# --- the compiled model -----------------------------------------------------------------------------------


@dataclass
class Model:
    """The configuration compiled to arrays the engine and the oracle index with process numbers.

    Processes are ordered: engine processes (onset, admission, death) first, then ``gp`` outputs.
    Rates are per DAY.
    """

    config: dict[str, Any]
    names: list[str]
    kind: np.ndarray  # (P,) 0 onset, 1 admission, 2 death, 3 gp
    target: np.ndarray  # (P,) bit for onsets, cause index for admissions, acute index (or -1 routine) for gp
    log_age: np.ndarray  # (P, MAX_AGE + 1) log rate per day at each year of age
    log_hr: np.ndarray  # (F, P)
    amp: np.ndarray  # (P,)
    phase: np.ndarray  # (P,) radians: season = 1 + amp * cos(omega * t - phase)
    requires: np.ndarray  # (P,) int64 bitmask
    excludes: np.ndarray  # (P,) int64 bitmask
    n_engine: int
    emergency: np.ndarray  # (P_engine,) bool: an emergency admission process
    elective: np.ndarray  # (P_engine,) bool
    # stays, by cause index
    los_mu: np.ndarray
    p_icu: np.ndarray
    death_logit: np.ndarray
    # admission labs: (L,) lab parameters and (L, C) cause shifts / draw probabilities, (L, N_BITS) bit shifts
    lab_ids: np.ndarray
    lab_logmed: np.ndarray
    lab_sigma: np.ndarray
    lab_male: np.ndarray
    lab_age: np.ndarray
    lab_bits: np.ndarray
    lab_cause: np.ndarray
    lab_draw: np.ndarray
    # calendar (days since epoch)
    data_end: float
    alive_from: float
    birth_span_days: float

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None) -> Model:
        """Compile a configuration (``default_config()`` if None), checking every name it uses."""
        config = copy.deepcopy(config if config is not None else DEFAULT_CONFIG)
        processes = _compile_processes(config["processes"])
        admitted = {p["target"] for p in config["processes"].values() if p["kind"] == "admission"}
        cal = config["calendar"]
        return cls(
            config=config, **processes, **_compile_stays(config["stays"], admitted),
            **_compile_labs(config["admission_labs"]),
            data_end=days_since_epoch(cal["cutoff"]) + 1.0,
            alive_from=days_since_epoch(cal["alive_from"]),
            birth_span_days=cal["birth_span_years"] * YEAR,
        )

    # -- hazards --

    def features(self, male: np.ndarray, race: np.ndarray, hisp: np.ndarray, cond: np.ndarray,
                 n_adm: np.ndarray, since_discharge: np.ndarray) -> np.ndarray:
        """(n, F) feature matrix; ``since_discharge`` in days (inf if never discharged)."""
        n = male.shape[0]
        x = np.empty((n, len(FEATURES)))
        x[:, 0] = male
        x[:, 1] = race == 1
        x[:, 2] = race == 2
        x[:, 3] = race == 3
        x[:, 4] = hisp
        x[:, 5:5 + cat.N_BITS] = (cond[:, None] >> np.arange(cat.N_BITS)) & 1
        k = 5 + cat.N_BITS
        x[:, k] = np.minimum(n_adm, N_PRIOR_CAP)
        d = since_discharge
        x[:, k + 1] = d < RECENCY_EDGES[0]
        x[:, k + 2] = (d >= RECENCY_EDGES[0]) & (d < RECENCY_EDGES[1])
        x[:, k + 3] = (d >= RECENCY_EDGES[1]) & (d < RECENCY_EDGES[2])
        return x

    def rates(self, age_years: np.ndarray, x: np.ndarray, cond: np.ndarray, procs: slice | None = None) -> np.ndarray:
        """(n, P) hazards per day, before seasonality, zero where a process is not eligible."""
        sl = procs if procs is not None else slice(None)
        ai = np.clip(np.floor(age_years + 1e-9).astype(np.int64), 0, MAX_AGE)
        # float32: the exponential over (rows x processes) is the engine's hottest line, and rates need no more.
        eta = x.astype(np.float32) @ self._log_hr32[:, sl]
        eta += self._log_age32[ai, sl]
        lam = np.exp(eta, out=eta)
        req, exc = self.requires[sl], self.excludes[sl]
        c = cond[:, None]
        lam *= ((c & req) == req) & ((c & exc) == 0)
        return lam

    def __post_init__(self) -> None:
        self._log_hr32 = self.log_hr.astype(np.float32)
        self._log_age32 = np.ascontiguousarray(self.log_age.T).astype(np.float32)  # (age, P)

    def season(self, procs: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Seasonal factor of process ``procs[i]`` at time ``t[i]`` (days since epoch)."""
        return 1.0 + self.amp[procs] * np.cos(OMEGA * t - self.phase[procs])

    def season_integral(self, w: np.ndarray, t0: np.ndarray, t1: np.ndarray, procs: slice) -> np.ndarray:
        """sum_k w[:, k] * integral_{t0}^{t1} season_k(u) du, for rates ``w`` (n, K) of processes ``procs``.

        Closed form: sum_k w_k [dt + a_k / omega (sin(omega t1 - phi_k) - sin(omega t0 - phi_k))], grouped so
        each row costs four trigonometric calls whatever the number of processes.
        """
        a, ph = self.amp[procs], self.phase[procs]
        total = w.sum(1)
        c = w @ (a * np.cos(ph))
        s = w @ (a * np.sin(ph))
        return total * (t1 - t0) + (c * (np.sin(OMEGA * t1) - np.sin(OMEGA * t0))
                                    - s * (np.cos(OMEGA * t1) - np.cos(OMEGA * t0))) / OMEGA

    # -- stays --

    def los_log_mu(self, cause: np.ndarray, age_years: np.ndarray) -> np.ndarray:
        """Log-median of (length of stay - minimum), days."""
        st = self.config["stays"]
        return self.los_mu[cause] + st["los_per_year_of_age"] * (age_years - 60.0)

    def p_death(self, cause: np.ndarray, age_years: np.ndarray, cond: np.ndarray, icu: np.ndarray) -> np.ndarray:
        """Probability of dying in hospital (at the end of the stay)."""
        st = self.config["stays"]
        n_comorb = np.zeros(cond.shape[0])
        for b in cat.COMORBIDITY_BITS:
            n_comorb += (cond >> b) & 1
        logit = (self.death_logit[cause] + st["death_per_year_of_age"] * (age_years - 75.0)
                 + st["death_per_comorbidity"] * np.minimum(n_comorb, 6) + st["death_if_icu"] * icu)
        return 1.0 / (1.0 + np.exp(-logit))

    def lab_log_mu(self, cause: np.ndarray, age_years: np.ndarray, male: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """(n, L) log-median of each admission lab."""
        bits = ((cond[:, None] >> np.arange(cat.N_BITS)) & 1).astype(float)
        return (self.lab_logmed[None, :] + male[:, None] * self.lab_male[None, :]
                + (age_years - 60.0)[:, None] * self.lab_age[None, :] + bits @ self.lab_bits.T
                + self.lab_cause[:, cause].T)


OMEGA: Final = 2.0 * math.pi / SEASON_YEAR


def _lookup(table: dict[str, int], name: str, where: str) -> int:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{where}: unknown name {name!r}; known: {', '.join(sorted(table))}") from None


# --- compiling a configuration ------------------------------------------------------------------------------


def _compile_processes(procs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The processes as arrays: engine processes first (in configuration order), then the ``gp`` ones."""
    kind_code = {"onset": 0, "admission": 1, "death": 2, "gp": 3}
    order = sorted(procs, key=lambda n: (kind_code[procs[n]["kind"]] == 3, list(procs).index(n)))
    if sum(procs[n]["kind"] == "death" for n in order) != 1:
        raise ValueError("the configuration needs exactly one 'death' process")
    feat = {f: i for i, f in enumerate(FEATURES)}
    n_proc = len(order)
    kind = np.array([kind_code[procs[n]["kind"]] for n in order], dtype=np.int8)
    target = np.full(n_proc, -1, dtype=np.int64)
    log_age = np.empty((n_proc, MAX_AGE + 1))
    log_hr = np.zeros((len(FEATURES), n_proc))
    amp = np.zeros(n_proc)
    phase = np.zeros(n_proc)
    requires = np.zeros(n_proc, dtype=np.int64)
    excludes = np.zeros(n_proc, dtype=np.int64)
    ages = np.arange(MAX_AGE + 1) + 0.5
    for j, name in enumerate(order):
        p = procs[name]
        tgt = p["target"]
        if p["kind"] == "onset":
            target[j] = _lookup(cat.BIT, tgt, name)
            excludes[j] |= 1 << int(target[j])
        elif p["kind"] == "admission":
            target[j] = _lookup(cat.CAUSE, tgt, name)
        elif p["kind"] == "gp":
            target[j] = -1 if tgt == "ROUTINE" else _lookup(cat.ACUTE, tgt, name)
        rates = np.asarray(p["per_1000py"], dtype=float)
        if rates.shape != (len(AGE_KNOTS),) or (rates < 0).any():
            raise ValueError(f"{name}: per_1000py needs {len(AGE_KNOTS)} non-negative rates (ages {AGE_KNOTS})")
        log_rate = np.log(np.maximum(rates, 1e-9) / 1000.0 / YEAR)
        log_age[j] = np.interp(ages, AGE_KNOTS, log_rate)
        for f, hr in p["hr"].items():
            if hr <= 0:
                raise ValueError(f"{name}: hazard ratio for {f} must be positive")
            log_hr[_lookup(feat, f, name), j] = math.log(hr)
        amp[j], peak = p["season"]
        if not 0 <= amp[j] < 1:
            raise ValueError(f"{name}: seasonal amplitude must be in [0, 1)")
        phase[j] = 2 * math.pi * peak
        for b in p["requires"]:
            requires[j] |= 1 << _lookup(cat.BIT, b, name)
        for b in p["excludes"]:
            excludes[j] |= 1 << _lookup(cat.BIT, b, name)
    n_engine = int((kind != 3).sum())
    admit = kind[:n_engine] == 1
    is_em = np.array([cat.CAUSES[target[j]].admit == "EMERGENCY" if admit[j] else False
                      for j in range(n_engine)])
    return {"names": order, "kind": kind, "target": target, "log_age": log_age, "log_hr": log_hr, "amp": amp,
            "phase": phase, "requires": requires, "excludes": excludes, "n_engine": n_engine,
            "emergency": is_em, "elective": admit & ~is_em}


def _compile_stays(stays: dict[str, Any], admitted: set[str]) -> dict[str, np.ndarray]:
    """The course of a stay per cause; every cause some admission process ``admitted`` for needs one."""
    n_c = len(cat.CAUSES)
    los_mu = np.zeros(n_c)
    p_icu = np.zeros(n_c)
    death_logit = np.zeros(n_c)
    for c, (median, icu, death) in stays["causes"].items():
        i = _lookup(cat.CAUSE, c, "stays")
        los_mu[i] = math.log(median)
        p_icu[i] = icu
        death_logit[i] = math.log(death / (1 - death))
    missing = admitted - set(stays["causes"])
    if missing:
        raise ValueError(f"stays: no course configured for causes {sorted(missing)}")
    return {"los_mu": los_mu, "p_icu": p_icu, "death_logit": death_logit}


def _compile_labs(labs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The admission labs: log-normal parameters and the probability each cause draws each lab."""
    n_l = len(labs)
    n_c = len(cat.CAUSES)
    lab_ids = np.array([cat.CODE_ID[f"M_{k}"] for k in labs])
    lab_logmed = np.array([math.log(labs[k]["median"]) for k in labs])
    lab_sigma = np.array([labs[k]["sigma"] for k in labs])
    lab_male = np.array([labs[k].get("male", 0.0) for k in labs])
    lab_age = np.array([labs[k].get("age", 0.0) for k in labs])
    lab_bits = np.zeros((n_l, cat.N_BITS))
    lab_cause = np.zeros((n_l, n_c))
    lab_draw = np.zeros((n_l, n_c))
    for i, k in enumerate(labs):
        for b, s in labs[k].get("bits", {}).items():
            lab_bits[i, _lookup(cat.BIT, b, f"admission_labs.{k}")] = s
        for c, s in labs[k].get("causes", {}).items():
            lab_cause[i, _lookup(cat.CAUSE, c, f"admission_labs.{k}")] = s
        draw = labs[k]["draw"]
        lab_draw[i, :] = draw.get("default", 0.0)
        for c, p in draw.items():
            if c != "default":
                lab_draw[i, _lookup(cat.CAUSE, c, f"admission_labs.{k}")] = p
    for ci, cause in enumerate(cat.CAUSES):
        if cause.admit == "ELECTIVE":
            lab_draw[:, ci] = [0.9 if k in ELECTIVE_PANEL else 0.0 for k in labs]
    return {"lab_ids": lab_ids, "lab_logmed": lab_logmed, "lab_sigma": lab_sigma, "lab_male": lab_male,
            "lab_age": lab_age, "lab_bits": lab_bits, "lab_cause": lab_cause, "lab_draw": lab_draw}
