"""Timelines -> tokens: a vocabulary with a privacy floor, time/age/year/quantile tokens, encode and decode.

- :mod:`~foresight.tokens.vocab`: special tokens, prefixes, :class:`TokenizerConfig` and the fitted
  :class:`Vocabulary` (with the one definition of token classes: ``is_event``, ``is_time``, ``is_marker``, ...).
- :mod:`~foresight.tokens.fit`: fitting the vocabulary on the train split (privacy floor, marker bands, deciles).
- :mod:`~foresight.tokens.codec`: the token layout of a subject (drawn in its docstring), the token clock,
  ``encode_arrays`` and ``decode``.
- :mod:`~foresight.tokens.from_warehouse`: encoding subjects straight from the warehouse (``encode_subjects``).
- :mod:`~foresight.tokens.shards`: the token shard files of a split.
- :mod:`~foresight.tokens.folder`: a token folder is built aside, sealed (``COMPLETE``) and swapped in whole;
  ``check_complete`` is what every reader runs first.
- :mod:`~foresight.tokens.build`: ``tokenize``, the warehouse -> token shards stage.
"""

from __future__ import annotations

from foresight.tokens.build import summary_messages, tokenize
from foresight.tokens.codec import (
    NO_TIME,
    EncodedChunk,
    ages,
    concat_chunks,
    decode,
    encode_arrays,
    from_epoch,
    marker_values,
    merge_static_only,
    months_of,
    to_epoch,
    token_clock,
    years_of,
)
from foresight.tokens.fit import (
    MARKER_SOURCES,
    QUANTILE_BATCH_VALUES,
    TokenizeError,
    clock_marker_table,
    data_fingerprint,
    fit_markers,
    fit_vocabulary,
    floor_map,
)
from foresight.tokens.folder import (
    MARKER,
    IncompleteTokensError,
    TokenFolderError,
    building,
    check_complete,
    seal,
)
from foresight.tokens.from_warehouse import encode_subjects, map_codes, register_code_map, subject_events
from foresight.tokens.shards import INDEX_DTYPE, clock_minutes, first_markers, index_rows, write_shard, write_split
from foresight.tokens.vocab import (
    AGE_PREFIX,
    BIRTH_PREFIX,
    BOS,
    END,
    MINUTE,
    MONTH_PREFIX,
    PAD,
    PREFIX_HIERARCHIES,
    QUANTILE_PREFIX,
    RARE,
    SPECIAL_TOKENS,
    TIME_PREFIX,
    UNK_AGE,
    YEAR_MINUTES,
    YEAR_PREFIX,
    TokenizerConfig,
    Vocabulary,
    month_marker_tokens,
    time_tokens,
)

__all__ = [
    "AGE_PREFIX", "BIRTH_PREFIX", "BOS", "END", "INDEX_DTYPE", "MARKER", "MARKER_SOURCES", "MINUTE", "MONTH_PREFIX",
    "NO_TIME", "PAD", "PREFIX_HIERARCHIES", "QUANTILE_BATCH_VALUES", "QUANTILE_PREFIX", "RARE", "SPECIAL_TOKENS",
    "TIME_PREFIX", "UNK_AGE", "YEAR_MINUTES", "YEAR_PREFIX", "EncodedChunk", "IncompleteTokensError",
    "TokenFolderError", "TokenizeError", "TokenizerConfig", "Vocabulary", "ages", "building", "check_complete",
    "clock_marker_table", "clock_minutes", "concat_chunks", "data_fingerprint", "decode", "encode_arrays",
    "encode_subjects", "first_markers", "fit_markers", "fit_vocabulary", "floor_map", "from_epoch", "index_rows",
    "map_codes", "marker_values", "merge_static_only", "month_marker_tokens", "months_of", "register_code_map",
    "seal", "subject_events", "summary_messages", "time_tokens", "to_epoch", "token_clock", "tokenize", "write_shard",
    "write_split", "years_of",
]
