"""What every stage of :mod:`foresight.concepts` shares: the error it raises and the offline MedCAT setup."""

from __future__ import annotations

import logging
import os


class PackError(Exception):
    """A dictionary or model pack that cannot be used (unknown format, missing columns, unloadable pack)."""


def offline_medcat() -> None:
    """Offline, quiet MedCAT: no version check over the network on import, warnings only. Call before importing
    medcat."""
    os.environ.setdefault("MEDCAT_DISABLE_VERSION_CHECK", "true")
    logging.getLogger("medcat").setLevel(logging.WARNING)
