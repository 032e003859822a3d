"""Micro-batching: concurrent next-event requests share one forward pass.

The first request waits up to ``batch_wait_ms`` for others (or until ``max_batch`` are queued) only when others are
already waiting, and the whole group runs as ONE left-padded forward pass
(:meth:`foresight.forecast.Forecaster.event_distributions`). All model work runs on one worker thread, so the
event loop keeps accepting (and batching) requests while the model computes. ``bench/serve.py`` measures batched
vs unbatched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class MicroBatcher:
    """Collect concurrent items (up to ``max_batch``) and process them together.

    ``process(items) -> results`` runs on ``executor`` (one call per batch); a result that is an exception is
    raised to that item's caller only. While a batch computes, new items queue up and form the next batch.
    When the worker picks up an item and others are already waiting, it also waits up to ``max_wait_s`` for
    more; a lone item goes at once. (bench/serve.py: a fixed 5 ms window cost a lone client ~20% of its
    throughput and bought no throughput at 8-32 clients over continuous batching.)
    """

    def __init__(self, process: Callable[[list[Any]], list[Any]], executor: Callable[[], ThreadPoolExecutor],
                 max_batch: int = 32, max_wait_s: float = 0.005) -> None:
        self.process = process
        self.executor = executor
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.batches = 0
        self.items = 0
        self.largest = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` for the next batch and await its result (starting the worker on this loop if needed)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._worker())
        fut: asyncio.Future[Any] = loop.create_future()
        assert self._queue is not None
        await self._queue.put((item, fut))
        return await fut

    async def stop(self) -> None:
        """Cancel the worker task."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
        self._task = None

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        assert q is not None
        while True:
            batch = [await q.get()]
            # a lone request goes at once (no added latency when quiet); when others are already queued there
            # is concurrency, and waiting a few ms for the rest of the burst makes the batch worth it
            deadline = loop.time() + (self.max_wait_s if not q.empty() else 0.0)
            while len(batch) < self.max_batch:
                try:
                    batch.append(q.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # callers that went away are skipped
            if not live:
                continue
            self.batches += 1
            self.items += len(live)
            self.largest = max(self.largest, len(live))
            try:
                results = await loop.run_in_executor(self.executor(), self.process, [i for i, _ in live])
            except Exception as exc:  # the whole batch failed: every caller hears why
                results = [exc] * len(live)
            for (_, fut), res in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def stats(self) -> dict[str, Any]:
        """Batching counters since start, for the model card."""
        mean = round(self.items / self.batches, 3) if self.batches else None
        return {"max_batch": self.max_batch, "batch_wait_ms": self.max_wait_s * 1000, "batches": self.batches,
                "requests": self.items, "mean_batch_size": mean, "largest_batch": self.largest}
