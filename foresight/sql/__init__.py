"""Every .sql file of the project, and the one loader that reads them.

Files live in one folder per concern (``common/`` for the warehouse DDL and the SQL macros every source uses,
``mimic_iv/``, ``synthea/``, ``fhir/``, ``meds/``, ``notes/``). A file may be split into named sections with lines
``-- section: NAME``; :func:`sections` returns them in order, :func:`load` the whole file.

>>> "CREATE" in load("common", "ehr_macros").upper()
True
"""

from __future__ import annotations

from functools import cache
from importlib import resources

SECTION_MARK = "\n-- section: "


@cache
def load(folder: str, name: str) -> str:
    """The text of ``foresight/sql/<folder>/<name>.sql`` (a FileNotFoundError names the file when it is missing)."""
    path = resources.files(__package__).joinpath(folder, f"{name}.sql")
    if not path.is_file():
        raise FileNotFoundError(f"no SQL file foresight/sql/{folder}/{name}.sql")
    return path.read_text(encoding="utf-8")


def sections(folder: str, name: str) -> dict[str, str]:
    """The ``-- section: NAME`` parts of one SQL file, in file order (text before the first mark is the header)."""
    parts = load(folder, name).split(SECTION_MARK)
    return {p.split()[0]: p.partition("\n")[2] for p in parts[1:]}
