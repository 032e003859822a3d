"""Hostile inputs and requests (issue 17): every case is generated here at test time, never committed as a binary.

Each test file covers one class of defect (atomic artifacts, unreadable inputs, malformed rows, the release gate,
the query service); docs/hostile.md lists every case with its expected outcome.
"""

from __future__ import annotations
