"""Data-use purposes: who provided each load, what it may be used for, and the check where data reach a model.

**The declaration.** ``foresight etl <source> --declaration FILE`` (JSON, or YAML for ``.yaml``/``.yml``)::

    provider: "Example NHS Trust"          # required: who provided the data
    purposes: [direct-care, planning]      # required: what they may be used for (lower-case slugs)
    controller: "Example NHS Trust"        # optional: the data controller
    expires: 2027-03-31                    # optional: ISO date, the last day the declaration covers anything

Unknown fields, an empty purposes list or a purpose that is not a slug are errors naming the file and the field
(:class:`DeclarationError`), raised before anything is loaded. A load is recorded with its declaration in
``load_declarations`` (:func:`record_load`, in the load's own transaction). A load without one is recorded as
provider ``undeclared`` with the one purpose ``unspecified``; loads made before the table existed read the same.

**Coverage** (:meth:`LoadProvenance.covers`). A run for purpose ``P`` may use a load when ``P`` is one of the
load's purposes *exactly* and its declaration has not expired (today is on or before ``expires``). There is no
hierarchy: ``research`` does not cover ``covid-19-research`` and ``covid-19-research`` does not cover
``research``; a provider who allows both lists both. ``unspecified`` (the default purpose of ``tokenize``) is
covered only by undeclared loads: a declaration cannot list it, so data that came with stated purposes are used
only by a run that states one of them.

**Where it is enforced.** ``tokenize`` (:func:`check_covered` over :func:`loads_reaching`: every load with events
of a subject that would be tokenized) refuses before it writes anything, and records the purpose and every load
(:func:`provenance_record`) in the vocabulary's report, which ships with the model. ``train`` re-checks that
record (:func:`check_recorded`: a token folder without one, or whose loads no longer cover its purpose, e.g. an
expired declaration, is refused). The model card lists the record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from foresight.hashing import sha256, sha256_json

UNDECLARED_PROVIDER = "undeclared"
UNSPECIFIED = "unspecified"
FIELDS = ("provider", "purposes", "controller", "expires")
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
SLUG_RULE = "lower-case letters and digits in words joined by '-', e.g. covid-19-research"


class DeclarationError(ValueError):
    """A declarations file that cannot be used; the message names the file and the field."""


class PurposeError(ValueError):
    """A run whose purpose the data do not cover (or an invalid purpose); one line naming the load."""


@dataclass(frozen=True)
class Declaration:
    """What a data provider declared for one load (see the module docstring)."""

    provider: str
    purposes: tuple[str, ...]
    controller: str | None = None
    expires: date | None = None
    file: str | None = None  # the declarations file it was read from
    sha256: str | None = None  # of that file's bytes

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "purposes": list(self.purposes), "controller": self.controller,
                "expires": self.expires.isoformat() if self.expires else None, "file": self.file,
                "sha256": self.sha256}


UNDECLARED = Declaration(provider=UNDECLARED_PROVIDER, purposes=(UNSPECIFIED,))


def check_purpose(purpose: str) -> str:
    """``purpose`` when it is a valid purpose slug, else :class:`PurposeError`."""
    if not isinstance(purpose, str) or not _SLUG.match(purpose):
        raise PurposeError(f"invalid purpose {purpose!r}: a purpose is {SLUG_RULE}")
    return purpose


def read_declaration(path: str | Path) -> Declaration:
    """The declaration in ``path`` (JSON; YAML when it ends in .yaml/.yml); :class:`DeclarationError` naming the
    file and the field otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeclarationError(f"{path}: cannot read the declarations file: {exc}") from exc
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise DeclarationError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'}: "
                               f"{' '.join(str(exc).split())}") from exc
    decl = parse_declaration(data, str(path))
    return Declaration(decl.provider, decl.purposes, decl.controller, decl.expires, file=str(path.absolute()),
                       sha256=sha256(raw))


def parse_declaration(data: Any, where: str = "declaration") -> Declaration:
    """A declaration from its parsed mapping; errors name ``where`` (the file) and the field."""
    if not isinstance(data, dict):
        raise DeclarationError(f"{where}: expected a mapping with fields {', '.join(FIELDS)}, got "
                               f"{type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise DeclarationError(f"{where}: field {unknown[0]!r}: unknown field (the fields are {', '.join(FIELDS)})")
    provider = data.get("provider")
    if not isinstance(provider, str) or not provider.strip():
        raise DeclarationError(f"{where}: field 'provider': required, a non-empty text naming who provided the data")
    controller = data.get("controller")
    if controller is not None and (not isinstance(controller, str) or not controller.strip()):
        raise DeclarationError(f"{where}: field 'controller': expected a non-empty text, got {controller!r}")
    return Declaration(provider=provider.strip(), purposes=_purposes(data.get("purposes"), where),
                       controller=controller.strip() if controller else None,
                       expires=_expires(data.get("expires"), where))


def _purposes(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise DeclarationError(f"{where}: field 'purposes': required, a non-empty list of purposes (e.g. "
                               f"[research, planning]), got {value!r}")
    out: list[str] = []
    for p in value:
        if not isinstance(p, str) or not _SLUG.match(p):
            raise DeclarationError(f"{where}: field 'purposes': {p!r} is not a purpose: a purpose is {SLUG_RULE}")
        if p == UNSPECIFIED:
            raise DeclarationError(f"{where}: field 'purposes': {UNSPECIFIED!r} is reserved for loads without a "
                                   "declaration; list the purposes the data may serve")
        if p not in out:
            out.append(p)
    return tuple(out)


def _expires(value: Any, where: str) -> date | None:
    if value is None:
        return None
    if isinstance(value, date) and not isinstance(value, datetime):  # YAML reads 2027-03-31 as a date
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise DeclarationError(f"{where}: field 'expires': expected an ISO date such as 2027-03-31, got {value!r}")


# --- the warehouse record ---------------------------------------------------------------------------------------


def record_load(con: Any, run_id: str, declaration: Declaration | None, opt_out_sha256: str | None) -> None:
    """Write the load's ``load_declarations`` row (``None``: undeclared); call it inside the load's transaction."""
    d = declaration or UNDECLARED
    con.execute("INSERT INTO load_declarations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, d.provider, d.controller, list(d.purposes), d.expires, d.file, d.sha256, opt_out_sha256,
                 datetime.now()])


@dataclass
class LoadProvenance:
    """One load whose rows reach a run: where they came from and what they may be used for."""

    run_id: str
    source: str
    events: int  # of its events reaching the run
    provider: str = UNDECLARED_PROVIDER
    purposes: tuple[str, ...] = (UNSPECIFIED,)
    controller: str | None = None
    expires: date | None = None
    declaration_sha256: str | None = None
    opt_out_sha256: str | None = None
    source_kind: str | None = None
    loaded_at: str | None = None  # when the load finished (etl_runs.finished_at)
    input_checksums: dict[str, str] = field(default_factory=dict)

    def covers(self, purpose: str, today: date | None = None) -> bool:
        """Whether this load may serve ``purpose`` today (exact match, not expired)."""
        if self.expires is not None and (today or date.today()) > self.expires:
            return False
        return purpose in self.purposes

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "source": self.source, "source_kind": self.source_kind,
                "events": self.events, "provider": self.provider, "controller": self.controller,
                "purposes": list(self.purposes), "expires": self.expires.isoformat() if self.expires else None,
                "declaration_sha256": self.declaration_sha256, "opt_out_sha256": self.opt_out_sha256,
                "loaded_at": self.loaded_at, "input_checksums": self.input_checksums}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoadProvenance:
        return cls(run_id=d["run_id"], source=d["source"], events=int(d.get("events") or 0),
                   provider=d["provider"], purposes=tuple(d["purposes"]), controller=d.get("controller"),
                   expires=date.fromisoformat(d["expires"]) if d.get("expires") else None,
                   declaration_sha256=d.get("declaration_sha256"), opt_out_sha256=d.get("opt_out_sha256"),
                   source_kind=d.get("source_kind"), loaded_at=d.get("loaded_at"),
                   input_checksums=dict(d.get("input_checksums") or {}))


_DECLARATIONS = ("SELECT run_id, provider, controller, purposes, expires, declaration_sha256, opt_out_sha256 "
                 "FROM load_declarations")
_NO_DECLARATIONS = ("SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS provider, NULL::VARCHAR AS controller, "
                    "NULL::VARCHAR[] AS purposes, NULL::DATE AS expires, NULL::VARCHAR AS declaration_sha256, "
                    "NULL::VARCHAR AS opt_out_sha256 WHERE false")


def loads_reaching(con: Any) -> list[LoadProvenance]:
    """Every load with events of a subject that has a split (what ``tokenize`` encodes), with its declaration.

    Honours subjects hidden on ``con`` (:func:`foresight.optout.hide_subjects`). A warehouse made before
    ``load_declarations`` existed (opened read-only, so the table was not created) reads as all undeclared.
    """
    has_table = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
                            "AND schema_name = 'main' AND table_name = 'load_declarations'").fetchall()[0][0]
    rows = con.execute(f"""
        WITH used AS (
            SELECT load_id, any_value(source) AS source, count(*) AS events FROM events
            WHERE subject_id IN (SELECT subject_id FROM subject_splits) GROUP BY load_id
        )
        SELECT u.load_id, u.source, u.events, d.provider, d.controller, d.purposes, d.expires,
               d.declaration_sha256, d.opt_out_sha256, r.source_kind, r.finished_at, r.input_checksums::VARCHAR
        FROM used u
        LEFT JOIN etl_runs r ON r.run_id = u.load_id
        LEFT JOIN ({_DECLARATIONS if has_table else _NO_DECLARATIONS}) d ON d.run_id = u.load_id
        ORDER BY u.load_id
    """).fetchall()
    out = []
    for (run_id, source, events, provider, controller, purposes, expires, decl_sha, optout_sha, kind, finished,
         checksums) in rows:
        lp = LoadProvenance(run_id=run_id, source=source, events=int(events), source_kind=kind,
                            loaded_at=finished.isoformat(timespec="seconds") if finished else None,
                            input_checksums=json.loads(checksums) if checksums else {})
        if provider is not None:
            lp.provider, lp.purposes, lp.controller, lp.expires = provider, tuple(purposes), controller, expires
            lp.declaration_sha256, lp.opt_out_sha256 = decl_sha, optout_sha
        out.append(lp)
    return out


# --- the check ---------------------------------------------------------------------------------------------------


def refusal(load: LoadProvenance, purpose: str, today: date | None = None) -> str:
    """Why ``load`` does not cover ``purpose``, in one line naming the load, its provider and its purposes."""
    today = today or date.today()
    what = (f"load {load.run_id} (source {load.source}) from provider {load.provider!r} "
            f"(allowed purposes: {', '.join(load.purposes)})")
    if load.expires is not None and today > load.expires and purpose in load.purposes:
        return f"{what}: its declaration expired on {load.expires.isoformat()}"
    if load.provider == UNDECLARED_PROVIDER:
        return (f"{what} has no declaration, so it is usable only for purpose {UNSPECIFIED!r}; re-load it with "
                "--declaration FILE")
    if purpose == UNSPECIFIED:
        return f"{what}: declared data serve only a stated purpose; run for one of those purposes (--purpose)"
    return f"{what} does not allow it"


def check_covered(loads: list[LoadProvenance], purpose: str, today: date | None = None) -> None:
    """:class:`PurposeError` (one line) naming the first load that does not cover ``purpose``."""
    check_purpose(purpose)
    bad = [lp for lp in loads if not lp.covers(purpose, today)]
    if bad:
        more = f" (and {len(bad) - 1} more load(s) not covering it)" if len(bad) > 1 else ""
        raise PurposeError(f"purpose {purpose!r} is not covered: {refusal(bad[0], purpose, today)}{more}")


def provenance_record(loads: list[LoadProvenance], purpose: str) -> dict[str, Any]:
    """What a token folder (and then the model card) records: the purpose, when it was checked, every load."""
    return {"purpose": purpose, "checked_on": date.today().isoformat(), "rule": "exact purpose, not expired",
            "loads": [lp.to_json() for lp in loads]}


def fingerprint(loads: list[LoadProvenance], purpose: str) -> str:
    """What decides a run's provenance record, less run ids and dates: the same data under the same declarations
    for the same purpose give the same digest (a pipeline cache key)."""
    parts = [[lp.source, lp.provider, list(lp.purposes), str(lp.expires), lp.declaration_sha256,
              lp.opt_out_sha256, lp.input_checksums] for lp in loads]
    return sha256_json([purpose, sorted(parts, key=lambda p: json.dumps(p, sort_keys=True))])


def check_recorded(record: dict[str, Any] | None, where: str, today: date | None = None) -> dict[str, Any]:
    """Re-check a token folder's recorded provenance (``train`` runs it); :class:`PurposeError` when it is missing
    or its loads no longer cover its purpose (an expired declaration). Returns the record."""
    if not record or "purpose" not in record or "loads" not in record:
        raise PurposeError(f"{where}: records no data-use purpose or provenance (tokenized by an older foresight, "
                           "or not by `foresight tokenize`); re-run `foresight tokenize --purpose P`")
    try:
        loads = [LoadProvenance.from_json(d) for d in record["loads"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PurposeError(f"{where}: unreadable provenance record ({exc}); re-run `foresight tokenize`") from exc
    try:
        check_covered(loads, record["purpose"], today)
    except PurposeError as exc:
        raise PurposeError(f"{where}: {exc}") from None
    return record
