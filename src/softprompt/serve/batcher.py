"""Dynamic batching: rows from many requests, clients and adapters share model calls.

Every request is split into rows (one text under one adapter) that go into one asyncio queue. A single batching
task takes the first waiting row, gathers more for at most ``max_wait_ms`` (or until ``max_batch_size`` rows), and
hands the batch to a single worker thread that runs the model, so the event loop keeps accepting requests while the
model computes; whatever queues up meanwhile forms the next batch without waiting. The model's mixed-adapter forward
then runs all rows of a batch in as few backbone passes as their adapters allow (one, for compatible adapters).

Failure isolation: if a batch fails, its requests are retried one at a time so that a bad row only fails its own
request. Rows whose adapter was removed after they were queued fail with :class:`UnknownAdapterError` (HTTP 404).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import SoftPromptError
from ..multi import MultiAdapterModel, UnknownAdapterError
from .errors import TooLargeError


class OverloadedError(SoftPromptError):
    """The queue holds ``max_queue_rows`` rows already (HTTP 503: retry later)."""


@dataclass
class _Row:
    adapter: str
    text: str
    text_pair: str | None
    request: int  # id of the request the row belongs to (for failure isolation)
    future: asyncio.Future


@dataclass
class BatcherStats:
    """What the batcher did: batches, their sizes and how many adapters they mixed."""

    batches: int = 0
    rows: int = 0
    max_batch_rows: int = 0
    mixed_batches: int = 0  # batches holding rows of more than one adapter
    model_calls: int = 0
    busy_seconds: float = 0.0
    sizes: collections.Counter = field(default_factory=collections.Counter)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches, "rows": self.rows, "max_batch_rows": self.max_batch_rows,
            "mixed_batches": self.mixed_batches, "model_calls": self.model_calls,
            "busy_seconds": round(self.busy_seconds, 4),
            "mean_batch_rows": round(self.rows / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "recent": [dict(r) for r in self.recent],
        }


class DynamicBatcher:
    """Queue + batching task + one model thread. ``await start()`` inside the serving event loop first."""

    def __init__(self, model: MultiAdapterModel, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 mixed: bool = True, max_queue_rows: int = 4096):
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.mixed = mixed
        self.max_queue_rows = int(max_queue_rows)
        self.stats = BatcherStats()
        self._stats_lock = threading.Lock()
        self._queue: asyncio.Queue[_Row] | None = None
        self._task: asyncio.Task | None = None
        self._getter: asyncio.Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._requests = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        # One thread: the model runs one batch at a time (it holds per-pass state), never on the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softprompt-model")
        self._task = asyncio.create_task(self._loop(), name="softprompt-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._getter is not None:
            self._getter.cancel()
        while self._queue is not None and not self._queue.empty():
            row = self._queue.get_nowait()
            if not row.future.done():
                row.future.set_exception(OverloadedError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch: those in the queue, plus one a finished queue ``get`` holds for the batching
        task while it waits for the model (the get outlives its timeout, see ``_next_row``)."""
        if self._queue is None:
            return 0
        held = self._getter is not None and self._getter.done() and not self._getter.cancelled()
        return self._queue.qsize() + int(held)

    # ---- submitting --------------------------------------------------------------------------------------------
    async def submit(self, adapters: Sequence[str], texts: Sequence[str],
                     pairs: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """Queue rows (row i: ``texts[i]`` under ``adapters[i]``) and wait for their predictions, in order."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() has not been awaited")
        if len(texts) > self.max_queue_rows:  # "retry later" would never help: the queue cannot ever hold it
            raise TooLargeError(f"this request makes {len(texts)} rows, more than the queue ever holds "
                                f"({self.max_queue_rows}, --max-queue-rows); split it into smaller requests")
        if self.queued_rows + len(texts) > self.max_queue_rows:
            raise OverloadedError(f"{self.queued_rows} rows are queued (limit {self.max_queue_rows}); retry later")
        loop = asyncio.get_running_loop()
        self._requests += 1
        pairs = list(pairs) if pairs is not None else [None] * len(texts)
        rows = [_Row(a, t, p, self._requests, loop.create_future()) for a, t, p in zip(adapters, texts, pairs)]
        for row in rows:
            self._queue.put_nowait(row)
        try:
            results = await asyncio.gather(*(r.future for r in rows), return_exceptions=True)
        except asyncio.CancelledError:  # the client went away: its queued rows are skipped
            for r in rows:
                r.future.cancel()
            raise
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return list(results)

    # ---- the batching task -------------------------------------------------------------------------------------
    async def _next_row(self, timeout: float | None) -> _Row | None:
        """The next queued row, or None after ``timeout`` seconds. The pending get survives a timeout (a cancelled
        ``queue.get()`` could lose a row that arrived at the same moment)."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        row, self._getter = self._getter.result(), None
        return row

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_row(None)
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                if self._getter is None and not self._queue.empty():
                    batch.append(self._queue.get_nowait())  # already waiting: no need to wait for it
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                row = await self._next_row(remaining)
                if row is None:
                    break
                batch.append(row)
            batch = [r for r in batch if not r.future.done()]  # cancelled by departed clients
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # _run handles row errors itself; this is a last resort
                results = [exc] * len(batch)
            for row, res in zip(batch, results):
                if row.future.done():
                    continue
                if isinstance(res, BaseException):
                    row.future.set_exception(res)
                else:
                    row.future.set_result(res)

    # ---- the model thread ------------------------------------------------------------------------------------
    def _run(self, batch: list[_Row]) -> list[Any]:
        """Predict a batch (in the model thread). Returns a result or an exception per row."""
        start = time.perf_counter()
        results: list[Any] = [None] * len(batch)
        live = []
        for i, row in enumerate(batch):
            if row.adapter in self.model:
                live.append(i)
            else:
                results[i] = UnknownAdapterError(f"unknown adapter {row.adapter!r}")
        if self.mixed:
            calls = [live] if live else []
        else:  # one adapter at a time, as a server without mixed batches must do
            by_adapter: dict[str, list[int]] = {}
            for i in live:
                by_adapter.setdefault(batch[i].adapter, []).append(i)
            calls = list(by_adapter.values())
        for rows in calls:
            self._predict(batch, rows, results)
        with self._stats_lock:
            s = self.stats
            s.batches += 1
            s.rows += len(batch)
            s.max_batch_rows = max(s.max_batch_rows, len(batch))
            adapters = {batch[i].adapter for i in live}
            s.mixed_batches += len(adapters) > 1
            s.model_calls += len(calls)
            s.busy_seconds += time.perf_counter() - start
            s.sizes[len(batch)] += 1
            s.recent.append({"rows": len(batch), "adapters": len(adapters), "model_calls": len(calls)})
        return results

    def _predict(self, batch: list[_Row], rows: list[int], results: list[Any]) -> None:
        try:
            out = self.model.predict([batch[i].text for i in rows], [batch[i].adapter for i in rows],
                                     [batch[i].text_pair for i in rows])
            for i, res in zip(rows, out):
                results[i] = res
        except Exception:  # any error of a batch is retried in parts (failure isolation)
            if len({batch[i].request for i in rows}) == 1:
                # One request only: retry row by row so the error names the row that caused it.
                for i in rows:
                    try:
                        results[i] = self.model.predict([batch[i].text], [batch[i].adapter], [batch[i].text_pair])[0]
                    except Exception as exc:  # reported to that row's request
                        results[i] = exc
                return
            # Several requests: retry each alone, so one bad request cannot fail the others.
            by_request: dict[int, list[int]] = {}
            for i in rows:
                by_request.setdefault(batch[i].request, []).append(i)
            for part in by_request.values():
                self._predict(batch, part, results)
