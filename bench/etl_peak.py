"""Where a load's memory peaks: an in-process MIMIC-IV load with a sampler thread.

Every 20 ms the sampler reads the process's RSS; at each new peak it records the main thread's foresight frames
(the statement's function and line) and glibc's own account (``mallinfo2``: memory in use and free inside malloc's
arenas, which DuckDB's allocations outside its buffer pool land in). Every 5 s it adds a timeline row. Prints one
JSON object: the peak, ``ru_maxrss``, the events loaded, the seconds and the timeline.

    FORESIGHT_MEMORY=1GB python bench/etl_peak.py bench/out/mimic-x300 /tmp/w.duckdb [--cli] > peak.json

``--cli`` runs ``foresight etl mimic-iv --json`` itself in this process (its imports and progress display too),
instead of :func:`foresight.sources.load`.

Inputs: ``bench/etl.py``'s ``replicate`` (``bench/out/mimic-x<k>``). The warehouse file is deleted first.
RESULTS.md (2026-12-06, tenth session) has what it found.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloc_mib() -> dict[str, int]:
    """glibc's arenas, mmapped blocks, bytes in use and free inside the arenas, in MiB."""
    m = _libc.mallinfo2()
    return {"arena": m.arena >> 20, "mmap": m.hblkhd >> 20, "inuse": m.uordblks >> 20, "free": m.fordblks >> 20}


def rss_mib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmRSS"))


def frames(thread_id: int) -> list[str]:
    """The last four foresight frames of a thread's stack, as file:line:function."""
    frame = sys._current_frames().get(thread_id)
    stack = traceback.extract_stack(frame) if frame else []
    return [f"{Path(s.filename).name}:{s.lineno}:{s.name}" for s in stack if "foresight" in s.filename][-4:]


def main() -> None:
    inp, db, cli = sys.argv[1], Path(sys.argv[2]), "--cli" in sys.argv[3:]
    main_thread, t0 = threading.get_ident(), time.perf_counter()
    peak: dict = {"rss": 0}
    timeline: list = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            r, now = rss_mib(), round(time.perf_counter() - t0, 1)
            if r > peak["rss"] + 3:
                peak.update(rss=r, at=now, where=frames(main_thread), malloc=malloc_mib())
            if not timeline or now - timeline[-1][0] > 5:
                timeline.append((now, r, frames(main_thread)[-1:], malloc_mib()))
            time.sleep(0.02)

    from foresight import sources, warehouse

    db.unlink(missing_ok=True)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    if cli:  # the command itself, in this process: its imports, progress display and JSON report included
        from contextlib import redirect_stdout
        from io import StringIO

        from foresight.cli import app
        out = StringIO()
        with redirect_stdout(out):
            app(["etl", "mimic-iv", "--input", inp, "--db", str(db), "--json"], standalone_mode=False)
        events = json.loads(out.getvalue())["events"]
    else:
        with warehouse.connect(db) as con:
            events = sources.load("mimic-iv", con, inp).events
    done.set()
    thread.join()
    print(json.dumps({"peak": peak, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "events": events, "seconds": round(time.perf_counter() - t0, 1), "cli": cli,
                      "timeline": timeline, "memory": os.environ.get("FORESIGHT_MEMORY")}))


if __name__ == "__main__":
    main()
