"""Write simulated chunks' free-text notes (``notes.csv``: subject_id, time, text).

One note per primary-care visit and per discharge, naming the patient's conditions, with negated, hypothetical
and family-history mentions that must NOT become diagnoses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from foresight.simulate import catalog as cat
from foresight.simulate.cohort import Chunk
from foresight.simulate.state import N_ACUTE, N_DIAGNOSIS, N_DISCHARGE
from foresight.simulate.writers.common import dict_lookup, iso_times, mix64, uuids

_NEGATABLE = ("pneumonia", "heart failure", "atrial fibrillation", "a stroke", "a pulmonary embolism",
              "deep vein thrombosis", "sepsis", "chest pain", "diabetes", "chronic kidney disease", "COPD",
              "a urinary tract infection", "dementia", "cellulitis")
_NEG_TEMPLATES = ("No evidence of {}.", "Denies {}.", "No history of {}.", "{} has been ruled out.",
                  "No signs of {}.")
_FAMILY = ("Mother had breast cancer.", "Father had a myocardial infarction at 58.",
           "Family history of type 2 diabetes mellitus.", "Sister has asthma.", "Father had colon cancer.",
           "Mother had a stroke in her seventies.", "No relevant family history.",
           "Family history of hypertension in both parents.")
_HYPOTHETICAL = ("Advised to return if symptoms of {} develop.", "Safety-netted for {}.",
                 "Will monitor for possible {}.")


class NotesWriter:
    """Writes one note per primary-care visit and per discharge of a chunk to ``parts/notes.<chunk>.csv``."""

    def __init__(self, parts: Path, seed: int, subject_key: str = "int") -> None:
        self.parts = parts
        self.seed = seed
        self.subject_key = subject_key  # 'int': MEDS subject ids; 'uuid': Synthea patient ids
        parts.mkdir(parents=True, exist_ok=True)

    def write_chunk(self, chunk: Chunk) -> int:
        """Write the chunk's notes; returns how many."""
        nt = chunk.notes
        n = nt["subject_id"].size
        if n == 0:
            return 0
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, chunk.index, 99]))
        order = np.lexsort((nt["time"], nt["subject_id"]))
        nt = {k: v[order] for k, v in nt.items()}
        sid = nt["subject_id"]
        male = dict_lookup(chunk.subjects["subject_id"], chunk.subjects["male"])(sid)
        fam = mix64(sid.astype(np.uint64) ^ np.uint64(self.seed)) % len(_FAMILY)
        neg_pick = rng.integers(0, len(_NEGATABLE), (n, 2))
        neg_tpl = rng.integers(0, len(_NEG_TEMPLATES), (n, 2))
        n_neg = rng.integers(0, 3, n)
        hypo = rng.random(n) < 0.15
        hypo_pick = rng.integers(0, len(_NEGATABLE), n)
        hypo_tpl = rng.integers(0, len(_HYPOTHETICAL), n)
        with_family = rng.random(n) < 0.3
        texts = []
        for i in range(n):
            cond = int(nt["cond"][i])
            names = [c.note for b, c in enumerate(cat.CONDITIONS) if (cond >> b) & 1]
            age = int(nt["age"][i])
            noun = ("man" if male[i] else "woman") if age >= 18 else ("boy" if male[i] else "girl")
            who = f"{age}-year-old {noun}" if age >= 2 else ("infant boy" if male[i] else "infant girl")
            kind, reason = int(nt["kind"][i]), int(nt["reason"][i])
            known = _join(names)
            if kind == N_DISCHARGE:
                cause = cat.CAUSES[reason]
                why = "for" if cause.admit == "ELECTIVE" else "with"
                parts = [f"Discharge summary. {who.capitalize()} admitted {why} {cause.note}."]
                parts.append(f"Comorbidities: {known}." if names else "No significant comorbidities.")
                parts.append("The patient died during this admission." if nt["died"][i]
                             else "Discharged in a stable condition.")
            elif kind == N_DIAGNOSIS:
                new = cat.CONDITIONS[reason].note
                others = _join([x for x in names if x != new])
                parts = [f"{who.capitalize()} reviewed in clinic. New diagnosis of {new}."]
                if others:
                    parts.append(f"Also known to have {others}.")
            elif kind == N_ACUTE:
                parts = [f"{who.capitalize()} presenting with {cat.ACUTES[reason].note}."]
                parts.append(f"Background of {known}." if names else "Otherwise well.")
            else:
                parts = [f"Routine review: {who}."]
                parts.append(f"Known {known}; stable." if names else "No significant past medical history.")
            lowered = " ".join(parts).lower()
            for j in range(int(n_neg[i]) if age >= 18 else 0):
                term = _NEGATABLE[neg_pick[i, j]]
                if term.removeprefix("a ") not in lowered:
                    text = _NEG_TEMPLATES[neg_tpl[i, j]].format(term)
                    parts.append(text[0].upper() + text[1:])
            if hypo[i]:
                term = _NEGATABLE[hypo_pick[i]]
                if term.removeprefix("a ") not in lowered:
                    parts.append(_HYPOTHETICAL[hypo_tpl[i]].format(term))
            if with_family[i]:
                parts.append(_FAMILY[fam[i]])
            texts.append(" ".join(parts))
        subject = uuids(self.seed, 1, sid) if self.subject_key == "uuid" else sid
        table = pa.table({"subject_id": subject, "time": iso_times(nt["time"]), "text": texts})
        with open(self.parts / f"notes.{chunk.index:06d}.csv", "wb") as fh:
            pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=False, quoting_style="needed"))
        return n


def _join(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
