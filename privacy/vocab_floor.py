"""The vocabulary floor, re-checked on what the model actually saw: every token covers >= K train subjects.

The tokenizer builds the vocabulary with a privacy floor (:func:`foresight.tokens.fit_vocabulary`); this probe
does not trust it. It recounts, from the train token shards the model was trained on, the distinct (real, not
canary) train subjects behind every token id. Exempt by design: the specials (``[PAD]``, ``[BOS]``, ``[END]``),
the catch-alls ``RARE`` and ``BIRTH//RARE``/``YEAR//RARE``/``AGE//RARE``, ``AGE//UNK``, interval tokens
``TIME//*``, the twelve calendar months ``MONTH//01``..``MONTH//12`` (fixed, whatever the data) and value tokens
``Q1``..``Q10`` (none of them names a code). A ``KIND//RARE`` catch-all is held to
the floor: the tokenizer only creates one whose pool reaches it.

It also lists which sensitive code groups have tokens (mental health, substance use, HIV, infectious disease;
patterns in the gate config), and counts the codes the model directory's ``vocab.json`` names in its code map
without them being tokens: those raw codes fell below the floor, and shipping their names discloses that at
least one person in the data had them. Counts only — this report travels with the model, so it never names them.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import numpy as np

EXEMPT = re.compile(r"^(\[.*\]|RARE|AGE//UNK|(BIRTH|YEAR|AGE)//RARE|TIME//.*|MONTH//\d\d|Q\d+)$")


def is_exempt(token: str) -> bool:
    """Whether ``token`` is outside the floor by design (see the module docstring)."""
    return bool(EXEMPT.match(token))


def check(vocab: Any, counts: np.ndarray, floor: int, sensitive: dict[str, list[str]]) -> dict[str, Any]:
    """The floor check from per-token train-subject ``counts`` (:func:`privacy.mia.token_subject_counts`)."""
    tokens = vocab.tokens
    below = [{"token": tokens[t], "subjects": int(c)} for t, c in enumerate(counts)
             if 0 < c < floor and not is_exempt(tokens[t])]
    unused = [tokens[t] for t, c in enumerate(counts) if c == 0 and not is_exempt(tokens[t])]
    groups = {}
    for name, patterns in sensitive.items():
        present = [{"token": t, "subjects": int(counts[i])} for i, t in enumerate(tokens)
                   if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
        listed = sum(1 for code, tok in vocab.code_map.items()
                     if tok != code and any(fnmatch.fnmatchcase(code, p) for p in patterns))
        groups[name] = {"tokens": present, "below_floor_codes_named_in_vocab": listed}
    named_below = sum(1 for code, tok in vocab.code_map.items() if tok != code)
    return {
        "floor": floor,
        "tokenizer_min_subjects": int(vocab.config.min_subjects),
        "tokens": len(tokens),
        "tokens_checked": int(sum(1 for t in tokens if not is_exempt(t))),
        "tokens_below_floor": below,
        "tokens_unused_in_train": len(unused),
        "min_subjects_per_token": int(min((c for t, c in enumerate(counts) if c > 0 and not is_exempt(tokens[t])),
                                          default=0)),
        "sensitive_groups": groups,
        "below_floor_codes_named_in_vocab": named_below,
    }
