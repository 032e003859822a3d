"""Is a concept mentioned in a note about THIS patient, NOW? A small ConText-style rule set.

MedCAT finds where a note names a concept; it does not say whether the note affirms it. "No evidence of
pneumonia", "rule out pneumonia" and "mother had breast cancer" all name a disease the patient does not (or not
known to) have, and "history of MI" names one from the past. This module classifies each mention into a set of
context categories, following the ConText algorithm (Harkema et al., J Biomed Inform 2009; NegEx, Chapman 2001):

- a *trigger* phrase ("no evidence of", "denies", "ruled out", "possible", "mother", "history of") modifies the
  mentions in its *scope*: after it (``forward``), before it (``backward``) or both, within the same sentence,
  up to ``max_scope`` words, and never past a *termination* term ("but", "however", "presenting", ...);
- *pseudo-triggers* ("no increase", "gram negative", "history of present illness") look like triggers but are
  not; they are matched first and block the shorter trigger inside them;
- a trigger inside a mention modifies nothing: "History of appendectomy", "Suspected COVID-19" and "Not in labor
  force" are concept names in their own right (SNOMED has them), not a past appendectomy, a possible COVID-19 or a
  negation of the concepts listed after them;
- a *section* sets a default for every mention in it: a "Family history" section makes them FAMILY, a "Past
  medical history" section HISTORICAL ("History of present illness" is neither).

Categories: NEGATED, HYPOTHETICAL (possible, suspected, rule out, risk of, if ...), FAMILY (someone other than
the patient: family members, "family history of"), HISTORICAL (history of, h/o, status post, previous ...).
A mention with NEGATED, HYPOTHETICAL or FAMILY is not a fact about the patient and must not become an event; a
HISTORICAL one is a fact from before the note.

Why rules written here rather than a library: medspacy's ConText (the maintained implementation) pins
spacy<3.8, whose thinc 8.2 needs numpy<2 (``pip install --dry-run medspacy`` would downgrade numpy 2.x to 1.26,
breaking torch/transformers here); negspacy covers negation only. MedCAT meta-annotation models (MetaCAT) are
used instead of these rules when a model pack has them (:func:`foresight.concepts.context_from_meta_anns`). The
trigger lists follow medspacy's default ConText rules and the NegEx lexicon, trimmed to the common phrasings
and tested sentence by sentence in tests/test_notes.py; extend ``RULES`` (or pass your own) for local idioms.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

NEGATED = "negated"
HYPOTHETICAL = "hypothetical"
FAMILY = "family"
HISTORICAL = "historical"
CATEGORIES = (NEGATED, HYPOTHETICAL, FAMILY, HISTORICAL)
# A mention with any of these is not a fact about the patient: no event.
EXCLUDING = frozenset({NEGATED, HYPOTHETICAL, FAMILY})
TERMINATE = "terminate"
PSEUDO = "pseudo"


@dataclass(frozen=True)
class Trigger:
    """One lexical cue: ``phrase`` (words; whitespace matches any run of whitespace), its ``category``
    (a context category, ``terminate`` or ``pseudo``), the ``direction`` it looks (``forward``, ``backward`` or
    ``both``) and how many words its scope reaches (``None``: to the end of the sentence)."""

    phrase: str
    category: str
    direction: str = "forward"
    max_scope: int | None = None


def _many(category: str, direction: str, max_scope: int | None, phrases: str) -> list[Trigger]:
    return [Trigger(p.strip(), category, direction, max_scope) for p in phrases.split(";") if p.strip()]


RULES: tuple[Trigger, ...] = tuple(
    # --- negation (NegEx / medspacy NEGATED_EXISTENCE) ---
    # explicit phrases reach to the end of the sentence ("denies fever, chills, nausea or vomiting") ...
    _many(NEGATED, "forward", None,
          "denies; denied; denying; deny; no evidence of; no evidence for; no signs of; no sign of;"
          "no symptoms of; negative for; free of; absence of; rules out; ruled out for; no history of; no hx of;"
          "no h/o; no known; never had; no complaints of; does not have; did not have; doesn't have;"
          "didn't have; has not had; have not had; not have; fails to reveal; failed to reveal; unremarkable for;"
          "no new; no suspicious; no findings of; no finding of; without evidence of; without any evidence of;"
          "without indication of; without signs of; no mention of; not demonstrate; not associated with;"
          "no further; no other; no acute; not known to have; not experiencing; not complaining of")
    # ... single words only a few words (NegEx's window), since they also occur in unrelated clauses
    + _many(NEGATED, "forward", 8, "no; not; without; never; nor; neither; absent")
    + _many(NEGATED, "backward", 4,
            "is ruled out; was ruled out; were ruled out; has been ruled out; have been ruled out; ruled out;"
            "is negative; was negative; were negative; negative; unlikely; is unlikely; not seen; was not seen;"
            "not present; is absent; was absent; absent; not detected; was not detected; not found; was not found;"
            "has been excluded; was excluded; excluded; is denied; was denied")
    # --- hypothetical / uncertain (medspacy POSSIBLE_EXISTENCE, HYPOTHETICAL) ---
    + _many(HYPOTHETICAL, "forward", None,
            "possible; possibly; probable; suspected; suspect; suspicion of; suspicious for; concern for;"
            "concerning for; question of; questionable; rule out; rule him out for; rule her out for; r/o;"
            "to rule out; evaluate for; evaluation for; evaluated for; assess for; screen for; screening for;"
            "risk of; risk for; at risk for; at risk of; in case of; watch for; monitor for; return if; call if;"
            "should he develop; should she develop; differential diagnosis; ddx; may have; might have;"
            "could have; may be; could be; likely; cannot exclude; can not exclude; worried about; worried for;"
            "prevention of; prophylaxis for; vaccination against; vaccine against; vaccination for; test for;"
            "tested for; testing for; screening test for")
    + _many(HYPOTHETICAL, "forward", 8, "if")
    + _many(HYPOTHETICAL, "forward", 4, "vs; versus; consider; considered")
    + _many(HYPOTHETICAL, "backward", 4,
            "is possible; is suspected; was suspected; is likely; is questionable; cannot be excluded;"
            "can not be excluded; cannot be ruled out; can not be ruled out; not excluded; not ruled out;"
            "is not excluded; vs; versus; or not; prophylaxis")
    # a vaccine, screening or test named after a disease is not that disease ("sars-cov-2 (covid-19) vaccine")
    + _many(HYPOTHETICAL, "backward", 2, "vaccine; vaccines; vaccination; immunization; screening; screening test")
    # --- someone other than the patient (medspacy FAMILY / experiencer) ---
    + _many(FAMILY, "forward", None,
            "family history of; family history; family hx of; family hx; fh of; fhx; fhx of;"
            "family member; family members")
    + _many(FAMILY, "forward", 6,
            "mother; mother's; father; father's; mom; dad; brother; brother's; sister; sister's; sibling;"
            "siblings; son; son's; daughter; daughter's; grandmother; grandfather; grandparent; grandparents;"
            "aunt; uncle; cousin; parent; parents; niece; nephew; twin; relative; relatives")
    + _many(FAMILY, "backward", 5,
            "in her mother; in his mother; in her father; in his father; in the family; in his family;"
            "in her family; in mother; in father; in a sibling; in siblings; runs in the family; runs in family")
    # --- past (medspacy HISTORICAL); a resolved condition did exist, so it is past, not negated ---
    + _many(HISTORICAL, "forward", None,
            "history of; hx of; h/o; past history of; past medical history of; medical history of;"
            "prior history of; previous history of; a history of; history significant for; remote history of;"
            "significant past medical history; status post; s/p; resolution of; no longer has; no longer")
    + _many(HISTORICAL, "forward", 5, "previous; previously; prior; remote; in the past; childhood; formerly")
    + _many(HISTORICAL, "backward", 4,
            "in the past; in childhood; as a child; years ago; previously; in remission; resolved; has resolved")
    # --- pseudo-triggers: look like a trigger, are not one ---
    + _many(PSEUDO, "forward", None,
            "no increase; no significant increase; no change; no significant change; no interval change;"
            "no definite change; not only; not necessarily; not certain if; not certain whether; not rule out;"
            "without difficulty; without any difficulty; gram negative; not cause; not drain; not extend;"
            "history of present illness; history of the present illness; history and physical; history taking;"
            "social history; surgical history; no further workup; if any; if needed; if necessary; as needed;"
            "mother tongue; prior to; previous visit")
    # --- termination: ends a trigger's scope ---
    + _many(TERMINATE, "both", None,
            "but; however; although; though; except; aside from; apart from; yet; which; who; whom;"
            "presenting; presents; presented; presenting with; complains of; complaining of; reports; reported;"
            "now; currently; is positive for; positive for; significant for; notable for; remarkable for;"
            "consistent with; diagnosed with; secondary to; because; cause of; source of; etiology of;"
            "origin of; reason for; nevertheless; still; while; whereas")
)

# Section headings that set a default category for the mentions under them.
_SECTION_CATEGORY: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r"history of (the )?present illness|present illness|\bhpi\b|chief complaint", re.I), None),
    (re.compile(r"family (medical )?(history|hx)|\bfhx?\b", re.I), FAMILY),
    (re.compile(r"(past|previous|prior) (medical |surgical |psychiatric )?(history|hx)|medical history|"
                r"surgical history|\bpmh\b|\bpsh\b|\bpmhx\b", re.I), HISTORICAL),
)
# A heading: a Markdown "# Title" line, or an upper-case label followed by a colon at the start of a line or
# sentence ("PAST MEDICAL HISTORY:, ..." in dictated notes).
_HEADING = re.compile(
    r"(?m)^[ \t]*#+[ \t]*(?P<md>[^\n]+)$"
    r"|(?:^|(?<=[.\n])[ \t]*,?[ \t]*)(?P<label>[A-Z][A-Z /&()-]{2,60}|(?i:family history|past medical history|"
    r"past surgical history|medical history|history of present illness|social history|surgical history|"
    r"allergies|medications|assessment and plan|assessment|plan|review of systems|impression)):")
# Sentence ends: a newline, or . ! ? ; followed by whitespace or a comma (so "2.5 mg" and "h/o" stay whole;
# dictated notes exported to CSV often read "...no edema.,ASSESSMENT: ...").
_SENTENCE_END = re.compile(r"\n|[.!?;](?=[\s,])")
_WORD = re.compile(r"\w+")


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged [start, end) intervals."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _overlaps(merged: list[tuple[int, int]], starts: list[int], s: int, e: int) -> bool:
    i = bisect.bisect_left(starts, e) - 1  # the last interval starting before e
    return i >= 0 and merged[i][1] > s


@dataclass(frozen=True)
class _Match:
    start: int
    end: int
    trigger: Trigger


class ContextRules:
    """A compiled rule set; :meth:`classify` gives each mention of a text its context categories.

    >>> rules = ContextRules()
    >>> text = "No evidence of pneumonia. Mother had breast cancer. History of asthma. Has diabetes."
    >>> spans = [(15, 24), (37, 50), (63, 69), (75, 83)]
    >>> [sorted(c) for c in rules.classify(text, spans)]
    [['negated'], ['family'], ['historical'], []]
    """

    def __init__(self, rules: Sequence[Trigger] = RULES) -> None:
        self.rules = tuple(rules)
        # A phrase may carry several rules (e.g. "vs" forward and backward): keep them all under its key.
        self._by_phrase: dict[str, list[Trigger]] = {}
        for r in self.rules:
            self._by_phrase.setdefault(self._key(r.phrase), []).append(r)
        # Longest phrase first, so at one position the alternation takes "no history of" over "no".
        phrases = sorted(self._by_phrase, key=len, reverse=True)
        body = "|".join(r"\s+".join(re.escape(w) for w in p.split()) for p in phrases)
        self._pattern = re.compile(rf"(?<![\w/'])(?:{body})(?![\w/'])", re.IGNORECASE)

    @staticmethod
    def _key(phrase: str) -> str:
        return " ".join(phrase.lower().split())

    def _matches(self, text: str) -> list[_Match]:
        out = []
        for m in self._pattern.finditer(text):
            for trig in self._by_phrase[self._key(m.group(0))]:
                out.append(_Match(m.start(), m.end(), trig))
        return out

    @staticmethod
    def sentences(text: str) -> list[int]:
        """Sorted start offsets of the sentences of ``text`` (the first is 0); a section heading starts one."""
        ends = {0, *(m.end() for m in _SENTENCE_END.finditer(text)), *(m.start() for m in _HEADING.finditer(text))}
        return sorted(ends)

    @staticmethod
    def sections(text: str) -> list[tuple[int, str | None]]:
        """(start offset, default category) of each section, in order; text before the first heading has none."""
        out: list[tuple[int, str | None]] = [(0, None)]
        for m in _HEADING.finditer(text):
            title = m.group("md") or m.group("label") or ""
            category = None
            for pattern, cat in _SECTION_CATEGORY:
                if pattern.search(title):
                    category = cat
                    break
            out.append((m.end(), category))
        return out

    def classify(self, text: str, spans: Sequence[tuple[int, int]]) -> list[frozenset[str]]:
        """The context categories of each mention ``(start, end)`` (character offsets) in ``text``."""
        if not spans:
            return []
        sent_starts = self.sentences(text)
        sections = self.sections(text)
        section_starts = [s for s, _ in sections]
        matches = self._matches(text)
        # Pseudo-triggers block any trigger they overlap (finditer already prefers the longer phrase at one
        # position; this also covers a shorter trigger starting inside a pseudo-trigger).
        pseudo = [(m.start, m.end) for m in matches if m.trigger.category == PSEUDO]
        # A trigger inside any mention is part of that concept's name ("not in labor force", "suspected COVID-19",
        # "concussion with no loss of consciousness"): it modifies nothing.
        blocked = _merge([*pseudo, *spans])
        blocked_starts = [b[0] for b in blocked]
        matches = [m for m in matches if m.trigger.category != PSEUDO
                   and not _overlaps(blocked, blocked_starts, m.start, m.end)]
        by_sentence: dict[int, list[_Match]] = {}
        for m in matches:
            by_sentence.setdefault(bisect.bisect_right(sent_starts, m.start) - 1, []).append(m)

        out = []
        for start, end in spans:
            cats: set[str] = set()
            section_cat = sections[bisect.bisect_right(section_starts, start) - 1][1]
            if section_cat:
                cats.add(section_cat)
            sentence = by_sentence.get(bisect.bisect_right(sent_starts, start) - 1, [])
            terminators = [m for m in sentence if m.trigger.category == TERMINATE]
            for m in sentence:
                trig = m.trigger
                if trig.category == TERMINATE:
                    continue
                if m.end <= start and trig.direction in ("forward", "both"):
                    gap = (m.end, start)
                elif m.start >= end and trig.direction in ("backward", "both"):
                    gap = (end, m.start)
                else:
                    continue
                if any(gap[0] <= t.start and t.end <= gap[1] for t in terminators):
                    continue
                if trig.max_scope is not None and len(_WORD.findall(text, gap[0], gap[1])) > trig.max_scope:
                    continue
                cats.add(trig.category)
            out.append(frozenset(cats))
        return out
